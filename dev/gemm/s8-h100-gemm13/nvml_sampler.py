#!/usr/bin/env python3
"""Samples the GPU's SM clock, power and clock-event reasons through NVML every ~2 ms until the
file named by argv[2] exists; writes CSV rows (unix time, MHz, W instant, W average, reasons) to
argv[1]. Phases of the benchmarks are logged with unix times so rows can be attributed to them."""
import ctypes
import os
import sys
import time

out, stop = sys.argv[1], sys.argv[2]
nvml = ctypes.CDLL('libnvidia-ml.so.1')
assert nvml.nvmlInit_v2() == 0
dev = ctypes.c_void_p()
assert nvml.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(dev)) == 0


class Value(ctypes.Union):
    _fields_ = [('d', ctypes.c_double), ('ui', ctypes.c_uint), ('ul', ctypes.c_ulong),
                ('ull', ctypes.c_ulonglong), ('sll', ctypes.c_longlong), ('si', ctypes.c_int),
                ('us', ctypes.c_ushort)]


class FieldValue(ctypes.Structure):
    _fields_ = [('fieldId', ctypes.c_uint), ('scopeId', ctypes.c_uint), ('timestamp', ctypes.c_longlong),
                ('latencyUsec', ctypes.c_longlong), ('valueType', ctypes.c_uint),
                ('nvmlReturn', ctypes.c_uint), ('value', Value)]


NVML_FI_DEV_POWER_INSTANT = 186
mhz = ctypes.c_uint()
mw = ctypes.c_uint()
reasons = ctypes.c_ulonglong()
fv = FieldValue()
with open(out, 'w') as f:
    f.write('t,mhz,w_inst,w_avg,reasons\n')
    n = 0
    while True:
        nvml.nvmlDeviceGetClockInfo(dev, 1, ctypes.byref(mhz))
        nvml.nvmlDeviceGetPowerUsage(dev, ctypes.byref(mw))
        nvml.nvmlDeviceGetCurrentClocksEventReasons(dev, ctypes.byref(reasons))
        fv.fieldId = NVML_FI_DEV_POWER_INSTANT
        fv.scopeId = 0
        winst = -1.0
        if nvml.nvmlDeviceGetFieldValues(dev, 1, ctypes.byref(fv)) == 0 and fv.nvmlReturn == 0:
            winst = fv.value.ui / 1000.0
        f.write(f'{time.time():.4f},{mhz.value},{winst:.1f},{mw.value / 1000.0:.1f},{reasons.value:#x}\n')
        n += 1
        if n % 50 == 0:
            if os.path.exists(stop):
                break
            f.flush()
        time.sleep(0.002)
