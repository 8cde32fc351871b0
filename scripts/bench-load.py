# Concurrent writers against one node; prints writes/s and writes per fsync (group commit).
# Usage: python3 scripts/bench-load.py HTTP_PORT WRITERS WRITES_PER_WRITER [KEYSPACE [QUERY]]
# (KEYSPACE defaults to cp; QUERY e.g. w=3 for an ap keyspace. fsyncs are the target node's.)
import http.client, threading, time, sys, re
port=int(sys.argv[1]); W=int(sys.argv[2]); N=int(sys.argv[3])
ks=sys.argv[4] if len(sys.argv)>4 else 'cp'; q='?'+sys.argv[5] if len(sys.argv)>5 else ''
def m():
    c=http.client.HTTPConnection('127.0.0.1',port); c.request('GET','/metrics'); t=c.getresponse().read().decode()
    f=lambda n: sum(float(l.split()[-1]) for l in t.splitlines() if l.startswith(n+' '))
    return f('capkv_storage_fsyncs_total'), f('capkv_storage_synced_waiters_total')
def w(i):
    c=http.client.HTTPConnection('127.0.0.1',port)
    for j in range(N):
        c.request('PUT',f'/v1/kv/{ks}/w{i}-{j}{q}',body=b'v'); r=c.getresponse(); r.read(); assert r.status==200
f0,w0=m(); t=time.time()
ts=[threading.Thread(target=w,args=(i,)) for i in range(W)]
[x.start() for x in ts]; [x.join() for x in ts]
dt=time.time()-t; f1,w1=m()
print(f"{W*N} writes in {dt:.2f}s = {W*N/dt:.0f} writes/s; fsyncs {f1-f0:.0f} ({(f1-f0)/dt:.0f}/s), writes per fsync {W*N/(f1-f0):.1f}")
