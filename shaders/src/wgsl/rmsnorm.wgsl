// RMSNorm over T rows: out[t, i] = x[t, i] / sqrt(mean_i(x[t, i]^2) + eps) * weight[i].
// Two entry points: row_per_thread (no barriers, for CPU drivers) and row_per_workgroup
// (strided sum of squares, then a tree reduction in workgroup memory).

struct Params {
    n_rows: u32,  // T
    n: u32,       // row length (hidden size)
    eps: f32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;           // (T, n)
@group(0) @binding(2) var<storage, read> weight: array<f32>;      // (n,)
@group(0) @binding(3) var<storage, read_write> out: array<f32>;   // (T, n)

const WG: u32 = {{WG}}u;

@compute @workgroup_size(WG)
fn row_per_thread(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let t = gid.x + gid.y * nwg.x * WG;
    if t >= params.n_rows {
        return;
    }
    let b = t * params.n;
    var ss = 0.0;
    for (var i = 0u; i < params.n; i++) {
        ss = fma(x[b + i], x[b + i], ss);
    }
    let inv = inverseSqrt(ss / f32(params.n) + params.eps);
    for (var i = 0u; i < params.n; i++) {
        out[b + i] = x[b + i] * inv * weight[i];
    }
}

var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(WG)
fn row_per_workgroup(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let t = wid.x + wid.y * nwg.x;
    if t >= params.n_rows {
        return;
    }
    let b = t * params.n;
    var ss = 0.0;
    for (var i = lid; i < params.n; i += WG) {
        ss = fma(x[b + i], x[b + i], ss);
    }
    partial[lid] = ss;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if lid < s {
            partial[lid] += partial[lid + s];
        }
        workgroupBarrier();
    }
    let inv = inverseSqrt(partial[0] / f32(params.n) + params.eps);
    for (var i = lid; i < params.n; i += WG) {
        out[b + i] = x[b + i] * inv * weight[i];
    }
}
