//! The corpus tool of `fuzz/run.sh`:
//! - `corpus seeds DIR`: writes every target's seeds and committed corpus to `DIR/<target>/`;
//! - `corpus pack DIR FILE`: packs the files of `DIR` into a committed corpus file: the
//!   smallest first, none over 4 KiB, at most 64 KiB in all (the corpus is for the short run
//!   in `cargo test`, and lives in git; the long runs keep everything in their working corpus).
use std::path::Path;

use haven_fuzz::corpus;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["seeds", dir] => {
            for t in haven_fuzz::targets() {
                let d = Path::new(dir).join(t.name);
                std::fs::create_dir_all(&d).unwrap();
                let inputs = (t.seeds)().into_iter().chain(corpus::committed(t.name));
                for (i, s) in inputs.enumerate() {
                    std::fs::write(d.join(format!("start-{i}")), s).unwrap();
                }
            }
        }
        ["pack", dir, file] => {
            let mut inputs = corpus::files(Path::new(dir));
            let found = inputs.len();
            inputs.sort_by_key(Vec::len);
            let mut total = 0;
            inputs.retain(|i| {
                total += i.len() + 4;
                i.len() <= 4096 && total <= 64 << 10
            });
            std::fs::write(file, corpus::pack(&inputs)).unwrap();
            println!("{file}: {} of {found} inputs", inputs.len());
        }
        _ => panic!("usage: corpus seeds DIR | corpus pack DIR FILE"),
    }
}
