// Matrix-matrix product for prefill: Y[t, r] (+)= sum_c W[r, c] * X[t, c] for T tokens at once.
//
// Either way each weight unit is decoded once and serves several tokens, which is what makes
// prefill cheaper per token than repeated matvecs over quantized weights. Two entry points:
//   tiled:          (real GPUs) a workgroup of 64 invocations computes a tile of 64 rows x 32
//                   tokens, 8 rows x 4 tokens per invocation; per step of 32 columns it decodes
//                   the weight tile ONCE into workgroup memory and serves all 32 tokens;
//   row_per_thread: (CPU drivers, where barriers are slow) one invocation per (MR rows, TPT
//                   tokens), no workgroup memory: each decoded unit serves TPT tokens and
//                   each slice of X serves MR rows. Grid: (rows / (WG * MR), tokens / TPT).
// W is one row-range part in the format spliced in below (the WEIGHTS placeholder); y_offset and y_stride place
// the part's rows in the full output (T, y_stride).

struct Params {
    rows: u32,        // rows in this part
    cols: u32,        // columns (a multiple of UNIT)
    q_offset: u32,    // vec4 index where the quant bytes of this part start (0 for floats)
    x_offset: u32,    // first element of X (a multiple of 4); X is (T, cols) row-major
    y_offset: u32,    // element of Y[0, row 0 of this part]
    y_stride: u32,    // elements between tokens in Y
    n_tokens: u32,    // T
    accumulate: u32,  // 1: add to Y (fused residual), 0: overwrite Y
    // Rows from split_row on go to Y[split_offset + t * split_stride + r - split_row] instead,
    // and from split2_row on likewise from split2_offset (matrices stacked in one weight,
    // written to their own regions by one dispatch).
    split_row: u32,
    split_offset: u32,
    split2_row: u32,
    split2_offset: u32,
    split_stride: u32,
    split2_stride: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> w: array<vec4<u32>>;        // (rows, cols) packed
// (T, cols) from x_offset: a storage array, or on CPU drivers a uniform window of it (see
// matvec.wgsl; the executor binds a window of tokens per dispatch).
{{X_DECL}}
@group(0) @binding(3) var<storage, read_write> y: array<f32>;        // (T, y_stride)

{{WEIGHTS}}

const WG: u32 = {{WG}}u;  // row_per_thread only; the tiled entry point is fixed at 64
const TPT: u32 = 8u;      // tokens per invocation in row_per_thread

fn store(r: u32, t: u32, v: f32) {
    var o = params.y_offset + t * params.y_stride + r;
    if r >= params.split_row {
        o = params.split_offset + t * params.split_stride + r - params.split_row;
    }
    if r >= params.split2_row {
        o = params.split2_offset + t * params.split2_stride + r - params.split2_row;
    }
    if params.accumulate != 0u {
        y[o] = y[o] + v;
    } else {
        y[o] = v;
    }
}

const MR: u32 = 4u;       // rows per invocation in row_per_thread

fn x_unit(xt: u32) -> array<vec4<f32>, UNIT_V4> {
    var xv: array<vec4<f32>, UNIT_V4>;
    for (var k = 0u; k < UNIT_V4; k++) {
        xv[k] = x[xt + k];
    }
    return xv;
}

// One token against the decoded unit of MR = 4 rows.
fn token4(
    w0: array<vec4<f32>, UNIT_V4>,
    w1: array<vec4<f32>, UNIT_V4>,
    w2: array<vec4<f32>, UNIT_V4>,
    w3: array<vec4<f32>, UNIT_V4>,
    xt: u32,
) -> vec4<f32> {
    let xv = x_unit(xt);
    return vec4<f32>(unit_dot(w0, xv), unit_dot(w1, xv), unit_dot(w2, xv), unit_dot(w3, xv));
}

fn store4(r0: u32, t: u32, a: vec4<f32>) {
    if t >= params.n_tokens {
        return;
    }
    for (var i = 0u; i < MR; i++) {
        if r0 + i < params.rows {
            store(r0 + i, t, a[i]);
        }
    }
}

@compute @workgroup_size(WG)
fn row_per_thread(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    // MR rows per invocation, rows across workgroups in x, groups of TPT tokens in y: the
    // tokens (and so every index into x) are the same across a workgroup. Each decoded unit
    // serves TPT tokens and each loaded slice of x serves MR rows; on CPU drivers, where every
    // load is a gather, both matter. Written out by hand (no arrays indexed by loop counters),
    // so the accumulators stay in registers.
    let r0 = (wid.x * WG + lid) * MR;
    let t0 = wid.y * TPT;
    if r0 >= params.rows || t0 >= params.n_tokens {
        return;
    }
    let units = params.cols / UNIT;
    let cols4 = params.cols / 4u;
    let xb = params.x_offset / 4u;
    // Rows and tokens past the last one recompute it (in bounds) and are dropped when storing.
    let lr = params.rows - 1u;
    let lt = params.n_tokens - 1u;
    let ra = r0 * units;
    let rb = min(r0 + 1u, lr) * units;
    let rc = min(r0 + 2u, lr) * units;
    let rd = min(r0 + 3u, lr) * units;
    let o0 = xb + t0 * cols4;
    let o1 = xb + min(t0 + 1u, lt) * cols4;
    let o2 = xb + min(t0 + 2u, lt) * cols4;
    let o3 = xb + min(t0 + 3u, lt) * cols4;
    let o4 = xb + min(t0 + 4u, lt) * cols4;
    let o5 = xb + min(t0 + 5u, lt) * cols4;
    let o6 = xb + min(t0 + 6u, lt) * cols4;
    let o7 = xb + min(t0 + 7u, lt) * cols4;
    var a0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0);
    var a3 = vec4<f32>(0.0);
    var a4 = vec4<f32>(0.0);
    var a5 = vec4<f32>(0.0);
    var a6 = vec4<f32>(0.0);
    var a7 = vec4<f32>(0.0);
    for (var u = 0u; u < units; u++) {
        let w0 = w_decode(ra + u, params.q_offset);
        let w1 = w_decode(rb + u, params.q_offset);
        let w2 = w_decode(rc + u, params.q_offset);
        let w3 = w_decode(rd + u, params.q_offset);
        let c = u * UNIT_V4;
        a0 += token4(w0, w1, w2, w3, o0 + c);
        a1 += token4(w0, w1, w2, w3, o1 + c);
        a2 += token4(w0, w1, w2, w3, o2 + c);
        a3 += token4(w0, w1, w2, w3, o3 + c);
        a4 += token4(w0, w1, w2, w3, o4 + c);
        a5 += token4(w0, w1, w2, w3, o5 + c);
        a6 += token4(w0, w1, w2, w3, o6 + c);
        a7 += token4(w0, w1, w2, w3, o7 + c);
    }
    store4(r0, t0, a0);
    store4(r0, t0 + 1u, a1);
    store4(r0, t0 + 2u, a2);
    store4(r0, t0 + 3u, a3);
    store4(r0, t0 + 4u, a4);
    store4(r0, t0 + 5u, a5);
    store4(r0, t0 + 6u, a6);
    store4(r0, t0 + 7u, a7);
}

const TR: u32 = 64u;  // rows per tile
const TT: u32 = 32u;  // tokens per tile
const KS: u32 = 32u;  // columns per step (one quant block)

var<workgroup> ws: array<f32, 2048>;  // (KS, TR): decoded weights, transposed
var<workgroup> xs: array<f32, 1024>;  // (KS, TT): inputs, transposed

@compute @workgroup_size(64)
fn tiled(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r0 = wid.x * TR;
    let t0 = wid.y * TT;
    let ty = lid / 8u;  // rows ty*8 .. ty*8+8 of the tile
    let tx = lid % 8u;  // tokens tx*4 .. tx*4+4 of the tile
    let units = params.cols / UNIT;
    let cols4 = params.cols / 4u;
    let xb = params.x_offset / 4u;
    var acc: array<vec4<f32>, 8>;
    for (var i = 0u; i < 8u; i++) {
        acc[i] = vec4<f32>(0.0);
    }

    for (var k0 = 0u; k0 < params.cols; k0 += KS) {
        // Stage the weight tile: TR rows x KS/UNIT units, decoded once.
        for (var i = lid; i < TR * (KS / UNIT); i += 64u) {
            let rr = i / (KS / UNIT);
            let uu = i % (KS / UNIT);
            // Zeroed explicitly: SwiftShader keeps a loop-local array's old values.
            var wv: array<vec4<f32>, UNIT_V4>;
            for (var k = 0u; k < UNIT_V4; k++) {
                wv[k] = vec4<f32>(0.0);
            }
            // Float formats have 8-value units, so a row may end inside a step.
            if r0 + rr < params.rows && k0 + uu * UNIT < params.cols {
                wv = w_decode((r0 + rr) * units + k0 / UNIT + uu, params.q_offset);
            }
            for (var k = 0u; k < UNIT_V4; k++) {
                let kk = uu * UNIT + k * 4u;
                ws[(kk + 0u) * TR + rr] = wv[k].x;
                ws[(kk + 1u) * TR + rr] = wv[k].y;
                ws[(kk + 2u) * TR + rr] = wv[k].z;
                ws[(kk + 3u) * TR + rr] = wv[k].w;
            }
        }
        // Stage the input tile: TT tokens x KS columns, zero past the last token.
        for (var i = lid; i < TT * (KS / 4u); i += 64u) {
            let tt = i / (KS / 4u);
            let c4 = i % (KS / 4u);
            var v = vec4<f32>(0.0);
            if t0 + tt < params.n_tokens && k0 + c4 * 4u < params.cols {
                v = x[xb + (t0 + tt) * cols4 + k0 / 4u + c4];
            }
            let kk = c4 * 4u;
            xs[(kk + 0u) * TT + tt] = v.x;
            xs[(kk + 1u) * TT + tt] = v.y;
            xs[(kk + 2u) * TT + tt] = v.z;
            xs[(kk + 3u) * TT + tt] = v.w;
        }
        workgroupBarrier();
        for (var k = 0u; k < KS; k++) {
            let xv = vec4<f32>(
                xs[k * TT + tx * 4u],
                xs[k * TT + tx * 4u + 1u],
                xs[k * TT + tx * 4u + 2u],
                xs[k * TT + tx * 4u + 3u],
            );
            for (var i = 0u; i < 8u; i++) {
                acc[i] = fma(vec4<f32>(ws[k * TR + ty * 8u + i]), xv, acc[i]);
            }
        }
        workgroupBarrier();
    }

    for (var i = 0u; i < 8u; i++) {
        let r = r0 + ty * 8u + i;
        if r >= params.rows {
            break;
        }
        for (var j = 0u; j < 4u; j++) {
            let t = t0 + tx * 4u + j;
            if t < params.n_tokens {
                store(r, t, acc[i][j]);
            }
        }
    }
}
