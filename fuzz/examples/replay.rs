//! Runs one saved input through a target: `cargo run --release -p mdi-fuzz --example replay --
//! TARGET FILE` (a failure's `.bin` from the artifacts folder).
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(name), Some(file)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: replay TARGET FILE");
        std::process::exit(2);
    };
    let data = std::fs::read(file).expect("the input file");
    let mut t = mdi_fuzz::targets::by_name(name).expect("a known target");
    mdi_fuzz::meter::reset();
    let run = t.run(&data);
    let peak = mdi_fuzz::meter::peak();
    println!(
        "{} bytes through {name}: depth {}, peak {peak} bytes, limit {}{}",
        data.len(),
        run.depth,
        run.limit,
        if peak > run.limit {
            " (over the limit)"
        } else {
            ""
        }
    );
}
