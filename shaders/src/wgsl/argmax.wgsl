// Argmax over x[offset .. offset + n] in one workgroup, so greedy decoding reads back one u32.
// out[0] = the first index of the largest value (NaNs never win), out[1] = its f32 bits.
// Each invocation scans a strided slice, then a tree reduction keeps (value, lowest index).

struct Params {
    n: u32,
    offset: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;   // (2,)

const WG: u32 = {{WG}}u;
const NONE: u32 = 0xffffffffu;

var<workgroup> best_v: array<f32, WG>;
var<workgroup> best_i: array<u32, WG>;

// Whether candidate (v, i) beats the incumbent (bv, bi); NONE marks "no candidate yet".
fn beats(v: f32, i: u32, bv: f32, bi: u32) -> bool {
    if i == NONE || !(v == v) {
        return false;
    }
    return bi == NONE || v > bv || (v == bv && i < bi);
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32) {
    var bv = 0.0;
    var bi = NONE;
    for (var i = lid; i < params.n; i += WG) {
        let v = x[params.offset + i];
        if beats(v, i, bv, bi) {
            bv = v;
            bi = i;
        }
    }
    best_v[lid] = bv;
    best_i[lid] = bi;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if lid < s && beats(best_v[lid + s], best_i[lid + s], best_v[lid], best_i[lid]) {
            best_v[lid] = best_v[lid + s];
            best_i[lid] = best_i[lid + s];
        }
        workgroupBarrier();
    }
    if lid == 0u {
        out[0] = best_i[0];
        out[1] = bitcast<u32>(best_v[0]);
    }
}
