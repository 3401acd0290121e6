// Driver of the CPU emulation: reads the problem from DIR, runs one kernel over all blocks, writes the result.
// usage: harness fwd|bwd n d k depth n_tiles grid transpose dir
//        harness bfwd n d groups layers n_tiles grid transpose dir tail   (the register-blocked forward)
#include "prelude.h"
#include "kernel.cu"
template <class T> std::vector<T> rd(const char* dir, const char* name, size_t cnt) {
    std::vector<T> v(cnt); char p[512]; snprintf(p, 512, "%s/%s", dir, name);
    FILE* f = fopen(p, "rb"); if (!f || fread(v.data(), sizeof(T), cnt, f) != cnt) { fprintf(stderr, "read %s\n", p); exit(1); }
    fclose(f); return v;
}
template <class T> void wr(const char* dir, const char* name, const std::vector<T>& v) {
    char p[512]; snprintf(p, 512, "%s/%s", dir, name); FILE* f = fopen(p, "wb"); fwrite(v.data(), sizeof(T), v.size(), f); fclose(f);
}
int main(int argc, char** argv) {
    bool blk = !strcmp(argv[1], "bfwd"), fwd = blk || !strcmp(argv[1], "fwd");
    int n = atoi(argv[2]), d = atoi(argv[3]), k = atoi(argv[4]), depth = atoi(argv[5]), n_tiles = atoi(argv[6]),
        grid = atoi(argv[7]), transpose = atoi(argv[8]); const char* dir = argv[9];
    g_G = G;
    auto x = rd<io_t>(dir, "x.bin", (size_t)n * d);
    std::vector<int2> ij, tij; std::vector<vec2_t> cs, tcs; std::vector<int> off, slots;
    int tail = blk ? atoi(argv[10]) : 0;
    if (blk) {
        slots = rd<int>(dir, "slots.bin", (size_t)k * 8); cs = rd<vec2_t>(dir, "gcs.bin", (size_t)k * 12);
        off = rd<int>(dir, "goff.bin", depth + 1);
        if (tail) { tij = rd<int2>(dir, "tij.bin", tail); tcs = rd<vec2_t>(dir, "tcs.bin", tail); }
    } else {
        ij = rd<int2>(dir, "ij.bin", k); cs = rd<vec2_t>(dir, "cs.bin", k); off = rd<int>(dir, "off.bin", depth + 1);
    }
    std::vector<io_t> y((size_t)n * d), gx((size_t)n * d);
    std::vector<acc_t> gpart(blk ? 0 : (size_t)grid * k, 0);
    std::vector<io_t> gy;
    if (!fwd) gy = rd<io_t>(dir, "gy.bin", (size_t)n * d);
    std::barrier<> bar(NT); g_bar = &bar;
    for (int gi = 0; gi < NT / G; ++gi) g_grp.push_back(new std::barrier<>(G));
    gridDim.x = grid;
    for (unsigned b = 0; b < (unsigned)grid; ++b) {
        blockIdx.x = b;
        std::vector<std::thread> th;
        for (int t = 0; t < NT; ++t) th.emplace_back([&, t] {
            threadIdx.x = t;
            if (blk) kama_blk_fwd(x.data(), y.data(), slots.data(), cs.data(), off.data(), tij.data(), tcs.data(), n, d,
                                  depth, tail, n_tiles, d, d, transpose);
            else if (fwd) kama_fwd(x.data(), y.data(), ij.data(), cs.data(), off.data(), n, d, depth, n_tiles, d, d, transpose);
            else kama_bwd(x.data(), gy.data(), gx.data(), gpart.data(), ij.data(), cs.data(), off.data(), n, d, k, depth, n_tiles, d, d, d, transpose);
        });
        for (auto& t : th) t.join();
    }
    if (fwd) wr(dir, "y.bin", y); else { wr(dir, "gx.bin", gx); wr(dir, "gpart.bin", gpart); }
}
