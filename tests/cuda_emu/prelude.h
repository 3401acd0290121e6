// CPU emulation of the CUDA C kernels of kama._cuda, for tests without a GPU (tests/test_cuda_emulation.py).
// One std::thread per CUDA thread of a block, blocks one after another; __syncthreads is a std::barrier over the
// block, __shfl_xor_sync an exchange through memory with a barrier over the G threads of one rotation (a group is
// all active or all idle, as on the GPU). Shared memory is one static buffer: blocks run in sequence.
#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
struct alignas(8) float2 { float x, y; };
struct alignas(8) int2 { int x, y; };
struct dim3 { unsigned x = 0, y = 0, z = 0; };
thread_local dim3 threadIdx;
dim3 blockIdx, gridDim;
std::barrier<>* g_bar;
std::vector<std::barrier<>*> g_grp;
int g_G = 1;
double xbuf[4096];
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(x)
#define __shared__
#define __align__(n)
inline void __syncthreads() { g_bar->arrive_and_wait(); }
inline unsigned __activemask() { return 0xffffffffu; }
template <class T> T __shfl_xor_sync(unsigned, T v, int off) {
    int t = threadIdx.x, grp = t / g_G;
    xbuf[t] = (double)v;
    g_grp[grp]->arrive_and_wait();
    T r = (T)xbuf[t ^ off];
    g_grp[grp]->arrive_and_wait();
    return r;
}
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
alignas(16) unsigned char smem[1 << 20];
