//! AFL++ target `envelope` (corpus: fuzz/corpus/envelope/): see fuzz/targets.rs.

#[allow(dead_code)]
#[path = "../../../targets.rs"]
mod targets;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        targets::envelope(data);
    });
}
