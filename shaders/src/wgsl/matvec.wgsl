// Matrix-vector product for decode: y[y_offset + r] (+)= sum_c W[r, c] * x[x_offset + c].
//
// W is one row-range part of a weight matrix in the format spliced in below (which
// defines UNIT, UNIT_V4 and w_decode). Splitting big matrices into parts keeps every binding
// under max_storage_buffer_binding_size; y_offset places a part's rows in the full output.
// Two entry points, picked by the executor from the adapter:
//   row_per_thread:    one invocation per 4 rows, no barriers (fastest on CPU drivers such
//                      as lavapipe, where barriers and workgroup reductions are slow);
//   row_per_workgroup: a workgroup per row, units strided over invocations, then a tree
//                      reduction in workgroup memory (what real GPUs want).

struct Params {
    rows: u32,        // rows in this part
    cols: u32,        // columns (a multiple of UNIT)
    q_offset: u32,    // vec4 index where the quant bytes of this part start (0 for floats)
    x_offset: u32,    // first element of x (a multiple of 4)
    y_offset: u32,    // output element of this part's row 0
    accumulate: u32,  // 1: add to y (fused residual), 0: overwrite y
    // Rows from split_row on go to y[split_offset + r - split_row] instead, and from
    // split2_row on to y[split2_offset + r - split2_row] (matrices stacked in one weight, e.g.
    // FFN gate and up, written to their own regions by one dispatch).
    split_row: u32,
    split_offset: u32,
    split2_row: u32,
    split2_offset: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> w: array<vec4<u32>>;        // (rows, cols) packed
// (cols,) from x_offset: a storage array, or on CPU drivers a uniform array of the first
// x_window vec4s. llvmpipe loads a storage value lane by lane in a loop, but reads a uniform
// at a lane-uniform index once and broadcasts it, and every invocation reads the same x.
{{X_DECL}}
@group(0) @binding(3) var<storage, read_write> y: array<f32>;        // (y_offset + rows,)

const WG: u32 = {{WG}}u;

{{WEIGHTS}}

fn row_dot(r: u32, lane: u32, stride: u32) -> f32 {
    let units = params.cols / UNIT;
    let xb = params.x_offset / 4u;
    var acc = vec4<f32>(0.0);
    for (var u = lane; u < units; u += stride) {
        var wv = w_decode(r * units + u, params.q_offset);
        let xu = xb + u * UNIT_V4;
        for (var k = 0u; k < UNIT_V4; k++) {
            acc = fma(wv[k], x[xu + k], acc);
        }
    }
    return acc.x + acc.y + acc.z + acc.w;
}

fn store(r: u32, s: f32) {
    var i = params.y_offset + r;
    if r >= params.split_row {
        i = params.split_offset + r - params.split_row;
    }
    if r >= params.split2_row {
        i = params.split2_offset + r - params.split2_row;
    }
    if params.accumulate != 0u {
        y[i] = y[i] + s;
    } else {
        y[i] = s;
    }
}

const RPT: u32 = 4u;  // rows per invocation in row_per_thread

fn x_unit(xu: u32) -> array<vec4<f32>, UNIT_V4> {
    var xv: array<vec4<f32>, UNIT_V4>;
    for (var k = 0u; k < UNIT_V4; k++) {
        xv[k] = x[xu + k];
    }
    return xv;
}

// One invocation per RPT = 4 consecutive rows, no barriers. Each unit of x is loaded once and
// serves the 4 rows: on CPU drivers every per-invocation load is a gather, so loading x once
// per row would cost more than the weights themselves. Written out by hand (no arrays indexed
// by loop counters), so the accumulators stay in registers.
@compute @workgroup_size(WG)
fn row_per_thread(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    // Dispatches wider than 65535 workgroups spill into y.
    let r0 = (gid.x + gid.y * nwg.x * WG) * RPT;
    if r0 >= params.rows {
        return;
    }
    let units = params.cols / UNIT;
    let xb = params.x_offset / 4u;
    // Rows past the last one recompute it (in bounds) and are dropped below.
    let last = params.rows - 1u;
    let ra = r0 * units;
    let rb = min(r0 + 1u, last) * units;
    let rc = min(r0 + 2u, last) * units;
    let rd = min(r0 + 3u, last) * units;
    var acc = vec4<f32>(0.0);
    for (var u = 0u; u < units; u++) {
        let xv = x_unit(xb + u * UNIT_V4);
        let xs = x_prep(xv);
        let q = params.q_offset;
        acc += vec4<f32>(
            w_dot(ra + u, q, xv, xs),
            w_dot(rb + u, q, xv, xs),
            w_dot(rc + u, q, xv, xs),
            w_dot(rd + u, q, xv, xs),
        );
    }
    for (var i = 0u; i < RPT; i++) {
        if r0 + i < params.rows {
            store(r0 + i, acc[i]);
        }
    }
}

var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(WG)
fn row_per_workgroup(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = wid.x + wid.y * nwg.x;
    // Uniform across the workgroup, so the barriers below stay in uniform control flow.
    if r >= params.rows {
        return;
    }
    partial[lid] = row_dot(r, lid, WG);
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if lid < s {
            partial[lid] += partial[lid + s];
        }
        workgroupBarrier();
    }
    if lid == 0u {
        store(r, partial[0]);
    }
}
