// IEEE half -> f32 with integer operations, shared by the weight decoders.
// Not unpack2x16float: wgpu allows that builtin only where the driver can convert halves
// (Mesa Vulkan without shader-f16 cannot), and the kernels must run everywhere. Subnormal
// halves are scaled from integers so drivers that flush f32 denormals still decode them.
fn half2(p: u32) -> vec2<f32> {
    let h = vec2<u32>(p & 0xffffu, p >> 16u);
    let em = h & vec2<u32>(0x7fffu);
    // Rebias the exponent from 15 to 127: add (127 - 15) << 23 to the shifted bits.
    let normal = bitcast<vec2<f32>>((em << vec2<u32>(13u)) + vec2<u32>(0x38000000u));
    let special = bitcast<vec2<f32>>((em << vec2<u32>(13u)) | vec2<u32>(0x7f800000u));
    let subnormal = vec2<f32>(em) * 5.9604645e-8;  // 2^-24
    var v = select(normal, special, em >= vec2<u32>(0x7c00u));
    v = select(v, subnormal, em < vec2<u32>(0x0400u));
    return select(v, -v, (h & vec2<u32>(0x8000u)) != vec2<u32>(0u));
}
