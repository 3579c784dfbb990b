// Adapter probe: arithmetic throughput. Each invocation runs `iters` rounds of 8 independent
// vec4 fused multiply-adds (64 flops a round) on registers only; the multiplier and addend come
// from the parameters so nothing folds at compile time. Flops / time is the bound for
// compute-bound kernels on this adapter.

struct Params {
    threads: u32,
    iters: u32,
    m: f32,
    c: f32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;     // (threads,)

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.x;
    if t >= params.threads {
        return;
    }
    let m = vec4<f32>(params.m);
    let c = vec4<f32>(params.c);
    let s = f32(t) * 1e-6;
    var a0 = vec4<f32>(s, s + 1.0, s + 2.0, s + 3.0);
    var a1 = a0 + 0.1;
    var a2 = a0 + 0.2;
    var a3 = a0 + 0.3;
    var a4 = a0 + 0.4;
    var a5 = a0 + 0.5;
    var a6 = a0 + 0.6;
    var a7 = a0 + 0.7;
    for (var i = 0u; i < params.iters; i++) {
        a0 = fma(a0, m, c);
        a1 = fma(a1, m, c);
        a2 = fma(a2, m, c);
        a3 = fma(a3, m, c);
        a4 = fma(a4, m, c);
        a5 = fma(a5, m, c);
        a6 = fma(a6, m, c);
        a7 = fma(a7, m, c);
    }
    let r = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7;
    dst[t] = r.x + r.y + r.z + r.w;
}
