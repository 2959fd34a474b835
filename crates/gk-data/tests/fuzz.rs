//! A short fuzz run of every parser (`gk_data::fuzz`): mutants of the committed fixtures,
//! none may panic, take over 2 s, or grow resident memory by over 256 MB. The long run
//! is `groundkit fuzz` (docs/reliability.md has its counts).

use gk_data::fuzz::{run, targets, Bounds};
use std::path::Path;

#[test]
fn every_parser_survives_mutants_of_its_fixtures() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut failed = Vec::new();
    for t in targets(&root) {
        // torch files are the largest seeds (a zip parse reads every tensor): fewer inputs
        let inputs = match t.name {
            "torch" | "refer-refs" | "coco-instances" => 300,
            _ => 2000,
        };
        let r = run(
            &t,
            &Bounds {
                inputs,
                seed: 1,
                ..Default::default()
            },
            |_| {},
        );
        println!(
            "{:18} {} inputs ({} seeds): {} accepted, {} refused, {} failures; slowest {:.1} ms, resident growth {:?} B",
            r.target,
            r.inputs,
            t.seeds.len(),
            r.accepted,
            r.refused,
            r.failures.len(),
            r.slowest_ms,
            r.max_rss_growth
        );
        assert!(!t.seeds.is_empty(), "{}: no seeds", t.name);
        assert!(r.accepted > 0, "{}: not even the seeds parse", t.name);
        failed.extend(
            r.failures
                .into_iter()
                .map(|f| format!("{}: {} {}", t.name, f.0, f.1)),
        );
    }
    assert!(failed.is_empty(), "{failed:#?}");
}
