// Adapter probe: the cost of one dispatch. A single invocation writes one float; the time of a
// run of such dispatches (each waiting for the one before, as the kernels of a decode step
// do) divided by their number is what every dispatch pays before its work starts.

struct Params {
    threads: u32,
    iters: u32,
    m: f32,
    c: f32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;     // (1,)

@compute @workgroup_size(1)
fn main() {
    dst[0] = dst[0] * params.m + params.c;
}
