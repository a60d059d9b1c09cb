//! AFL++ target `sealed` (corpus: fuzz/corpus/sealed/): see fuzz/targets.rs.

#[allow(dead_code)]
#[path = "../../../targets.rs"]
mod targets;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        targets::sealed_envelope(data);
    });
}
