//! AFL++ target `policy` (corpus: fuzz/corpus/policy/): see fuzz/targets.rs.

#[allow(dead_code)]
#[path = "../../../targets.rs"]
mod targets;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        targets::policy(data);
    });
}
