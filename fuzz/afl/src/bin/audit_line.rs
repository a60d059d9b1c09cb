//! AFL++ target `audit_line` (corpus: fuzz/corpus/audit_line/): see fuzz/targets.rs.

#[allow(dead_code)]
#[path = "../../../targets.rs"]
mod targets;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        targets::audit_line(data);
    });
}
