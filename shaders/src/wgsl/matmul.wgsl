// Matrix-matrix product for prefill: Y[t, r] (+)= sum_c W[r, c] * X[t, c] for T tokens at once.
//
// Either way each weight unit is decoded once and serves several tokens, which is what makes
// prefill cheaper per token than repeated matvecs over quantized weights. Two entry points:
//   tiled:          (real GPUs) a workgroup of 64 invocations computes a tile of 64 rows x 32
//                   tokens, 8 rows x 4 tokens per invocation; per step of 32 columns it decodes
//                   the weight tile ONCE into workgroup memory and serves all 32 tokens;
//   row_per_thread: (CPU drivers, where barriers are slow) one invocation per (row, group of
//                   TPT tokens), no workgroup memory: each decoded unit serves TPT tokens.
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
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> w: array<vec4<u32>>;        // (rows, cols) packed
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;        // (T, cols)
@group(0) @binding(3) var<storage, read_write> y: array<f32>;        // (T, y_stride)

{{WEIGHTS}}

const WG: u32 = {{WG}}u;  // row_per_thread only; the tiled entry point is fixed at 64
const TPT: u32 = 8u;      // tokens per invocation in row_per_thread

fn store(r: u32, t: u32, v: f32) {
    let o = params.y_offset + t * params.y_stride + r;
    if params.accumulate != 0u {
        y[o] = y[o] + v;
    } else {
        y[o] = v;
    }
}

@compute @workgroup_size(WG)
fn row_per_thread(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let idx = gid.x + gid.y * nwg.x * WG;
    let groups = (params.n_tokens + TPT - 1u) / TPT;
    if idx >= params.rows * groups {
        return;
    }
    // Neighbouring invocations take neighbouring rows of the same tokens, so x reads coincide.
    let r = idx % params.rows;
    let t0 = (idx / params.rows) * TPT;
    let units = params.cols / UNIT;
    let cols4 = params.cols / 4u;
    let xb = params.x_offset / 4u;
    var acc: array<vec4<f32>, TPT>;
    for (var u = 0u; u < units; u++) {
        var wv = w_decode(r * units + u, params.q_offset);
        for (var j = 0u; j < TPT; j++) {
            // Past the last token, recompute the last one (in bounds) and drop it below.
            let xt = xb + min(t0 + j, params.n_tokens - 1u) * cols4 + u * UNIT_V4;
            for (var k = 0u; k < UNIT_V4; k++) {
                acc[j] = fma(wv[k], x[xt + k], acc[j]);
            }
        }
    }
    for (var j = 0u; j < TPT; j++) {
        if t0 + j < params.n_tokens {
            store(r, t0 + j, acc[j].x + acc[j].y + acc[j].z + acc[j].w);
        }
    }
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
            var wv: array<vec4<f32>, UNIT_V4>;
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
