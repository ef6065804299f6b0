# throwaway: the previous per-offset loop conv vs the gather-GEMM one, same run
import sys, torch, time, statistics
sys.path[:0]=["benchmarks", "."]
from bench_models import shell_voxels
from models.sparse import SparseVoxels
from models.trellis.sparse_conv import SparseConv3d, neighbour_map
from timing import measure
dev=torch.device('cuda')
def loop_conv(conv, x, nmap):
    f=x.feats; n=len(f)
    w=conv.conv.weight.to(f.dtype).reshape(conv.out_channels,-1,conv.in_channels).permute(1,2,0)
    out=f@w[13]+conv.conv.bias.to(f.dtype)
    for k in range(27):
        if k==13: continue
        col=nmap.rows[:,k]; o=(col<n).nonzero().squeeze(1); i=col[o]
        out=out.index_add(0,o,f.index_select(0,i)@w[k])
    return out
for n in (20000,50000):
    for ch in (128,256,1024):
        coords=shell_voxels(n,64,dev)
        x=SparseVoxels.from_list([coords],[torch.randn(n,ch,device=dev,dtype=torch.float16)])
        conv=SparseConv3d(ch,ch).to(dev,torch.float16); nm=neighbour_map(x.coords)
        with torch.no_grad():
            a,_=measure(lambda: conv(x), 10, dev); b,_=measure(lambda: loop_conv(conv,x,nm), 10, dev)
            err=(conv(x).feats.float()-loop_conv(conv,x,nm).float()).abs().max().item()
        print(f"N={n} C={ch}: gather-GEMM {a*1e3:.2f} ms, per-offset loop {b*1e3:.2f} ms, ratio {a/b:.2f}, maxdiff {err:.3g}", flush=True)
