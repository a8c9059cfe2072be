# Warp-stall samples of an ncu SASS source page (ncu -i REP --page source --print-source sass --csv, gzipped):
# totals by reason, then the N lines with the most samples. Usage: python3 ep27-ncu-stalls.py src.csv.gz N
import csv,gzip,sys
f=sys.argv[1]
rows=list(csv.reader(gzip.open(f,'rt')))
h=rows[1]; data=rows[2:]
ix={n:i for i,n in enumerate(h)}
S=ix['Warp Stall Sampling (All Samples)']; E=ix['Instructions Executed']
tot=sum(int(r[S] or 0) for r in data); tote=sum(int(r[E] or 0) for r in data)
print('samples',tot,'instr',tote)
cols=['stall_long_sb','stall_wait','stall_barrier','stall_not_selected','stall_selected','stall_math','stall_short_sb','stall_branch_resolving','stall_membar']
agg={c:sum(int(r[ix[c]] or 0) for r in data) for c in cols}
print({c:round(100*v/tot,1) for c,v in agg.items()})
top=sorted(range(len(data)),key=lambda i:-int(data[i][S] or 0))[:int(sys.argv[2])]
for i in sorted(top):
    r=data[i]
    print(f"{i:5d} {100*int(r[S])/tot:5.1f}% ex={int(r[E]):8d} lsb={r[ix['stall_long_sb']]:>5} wait={r[ix['stall_wait']]:>5} bar={r[ix['stall_barrier']]:>5} {r[1].strip()[:70]}")
