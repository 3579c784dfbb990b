// Embedding gather: out[t, :] = dequantized row ids[t] of the table, for T tokens.
//
// The table may be split into row-range parts (see matvec.wgsl); a dispatch over one part
// writes only the tokens whose id falls in [row_start, row_start + rows), so running every
// part fills every token. The host checks ids against the vocabulary first.
// One invocation per (token, unit of UNIT values).

struct Params {
    n_tokens: u32,    // T
    cols: u32,        // embedding width (a multiple of UNIT)
    q_offset: u32,    // vec4 index where the quant bytes of this part start
    row_start: u32,   // first vocabulary row held by this part
    rows: u32,        // rows held by this part
    out_offset: u32,  // first output element (a multiple of 4)
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> w: array<vec4<u32>>;         // (rows, cols) packed
@group(0) @binding(2) var<storage, read> ids: array<u32>;             // (T,)
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>; // (T, cols)

const WG: u32 = {{WG}}u;

{{WEIGHTS}}

@compute @workgroup_size(WG)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let i = gid.x + gid.y * nwg.x * WG;
    let units = params.cols / UNIT;
    if i >= params.n_tokens * units {
        return;
    }
    let t = i / units;
    let u = i % units;
    let id = ids[t];
    if id < params.row_start || id - params.row_start >= params.rows {
        return;
    }
    var wv = w_decode((id - params.row_start) * units + u, params.q_offset);
    let o = (params.out_offset + t * params.cols + u * UNIT) / 4u;
    for (var k = 0u; k < UNIT_V4; k++) {
        out[o + k] = wv[k];
    }
}
