//! The benchmark harness runs end to end (small and quick) and reports every scenario
//! with its baseline, ratio and target, with plots.

use std::process::Command;

use keel_tests::workspace_binary;

#[test]
fn the_harness_reports_every_scenario_beside_its_baseline() {
    let out = std::env::temp_dir().join(format!("keel-bench-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&out).expect("a temporary directory");
    let markdown = out.join("BENCHMARKS.md");
    std::fs::write(
        &markdown,
        "# Benchmarks\n\nprose\n\n<!-- bench:begin -->\nold\n<!-- bench:end -->\n\nmore prose\n",
    )
    .expect("writing the markdown");
    let run = Command::new(workspace_binary("bench").expect("the bench binary"))
        .args(["--quick", "--out"])
        .arg(&out)
        .arg("--markdown")
        .arg(&markdown)
        .output()
        .expect("running bench");
    assert!(
        run.status.success(),
        "bench failed: {}\n{}",
        String::from_utf8_lossy(&run.stderr),
        String::from_utf8_lossy(&run.stdout)
    );

    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("report.json")).expect("report.json"),
    )
    .expect("report.json is JSON");
    let rows = report["rows"].as_array().expect("rows");
    let with_target = |prefix: &str| {
        rows.iter()
            .filter(|r| {
                r["scenario"]
                    .as_str()
                    .is_some_and(|s| s.starts_with(prefix))
            })
            .filter(|r| r["target"].is_string() && r["met"].is_boolean())
            .count()
    };
    assert_eq!(with_target("Commands, 64 clients"), 1, "{rows:#?}");
    assert_eq!(with_target("Commands, 256 clients"), 1);
    assert_eq!(with_target("Catch-up"), 1);
    assert_eq!(
        with_target("Rebuild, orders"),
        2,
        "beside B_consume/B_upsert, and adaptive beside unpaced"
    );
    assert_eq!(with_target("Rebuild, daily_sales"), 1);
    assert_eq!(
        with_target("Queries, by id"),
        4,
        "idle, and during a rebuild paced (started by a command and requested) and unpaced"
    );
    assert_eq!(with_target("Queries, list"), 4);
    let named = |prefix: &str| {
        rows.iter()
            .filter(|r| {
                r["scenario"]
                    .as_str()
                    .is_some_and(|s| s.starts_with(prefix))
            })
            .count()
    };
    for processes in 1..=3 {
        assert_eq!(
            rows.iter()
                .filter(|r| r["scenario"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("Catch-up of orders")
                        && s.ends_with(&format!("{processes} processes"))))
                .count(),
            1,
            "catch-up with {processes} processes"
        );
    }
    for processes in 1..=3 {
        let rebuilds: Vec<&str> = rows
            .iter()
            .filter_map(|r| r["scenario"].as_str())
            .filter(|s| {
                s.starts_with("Rebuild of orders")
                    && s.contains(&format!("filled by {processes} running processes"))
            })
            .collect();
        assert_eq!(
            rebuilds.len(),
            1,
            "a rebuild with {processes} processes running"
        );
        assert!(
            !rebuilds[0].ends_with("(0 helped)"),
            "the running processes helped fill it: {}",
            rebuilds[0]
        );
    }
    assert_eq!(
        named("A killed projector's partitions move"),
        2,
        "SIGKILL and SIGTERM"
    );
    assert_eq!(named("Rebuild of orders while queries run"), 3);
    assert_eq!(
        named("Read-your-writes of healthy streams, one stream parked"),
        2
    );
    assert_eq!(
        named("Read-your-writes through a query API on a hot standby"),
        2
    );
    assert_eq!(with_target("Read-your-writes"), 1);
    // The cost of observability: each figure beside the same with it off.
    for (scenario, rows_of_it) in [
        ("Commands, 64 clients, traces exported", 3),
        ("Commands, 64 clients, /metrics scraped", 3),
        ("Read-your-writes, traces exported", 2),
        ("Reads by id, traces exported", 3),
    ] {
        let beside: Vec<_> = rows
            .iter()
            .filter(|r| {
                r["scenario"]
                    .as_str()
                    .is_some_and(|s| s.starts_with(scenario))
            })
            .filter(|r| {
                r["baseline"][0]
                    .as_str()
                    .is_some_and(|b| b.starts_with("traces off") || b.starts_with("not scraped"))
            })
            .collect();
        assert_eq!(beside.len(), rows_of_it, "{scenario}: {rows:#?}");
    }
    assert_eq!(with_target("Projector memory"), 1);
    for row in rows {
        let keel = row["keel"].as_f64().expect("a figure");
        assert!(keel.is_finite() && keel >= 0.0, "{row}");
        if let Some(ratio) = row["ratio"].as_f64() {
            let baseline = row["baseline"][1].as_f64().expect("a baseline figure");
            assert!(
                baseline > 0.0 && (ratio - keel / baseline).abs() < 1e-9,
                "{row}"
            );
        }
    }
    for name in ["B_consume", "B_upsert", "B_select p99"] {
        assert!(
            rows.iter().any(
                |r| r["measure"].as_str().is_some_and(|m| m.starts_with(name))
                    && r["keel"].as_f64().is_some_and(|v| v > 0.0)
            ),
            "{name} missing"
        );
    }
    assert!(
        rows.iter()
            .any(|r| r["measure"] == "resident MB per 100,000 streams"
                && r["keel"].as_f64().is_some_and(|v| v > 0.0)),
        "command API memory per stream missing"
    );
    let plots = report["plots"].as_array().expect("plots");
    assert!(plots.len() >= 5, "{plots:?}");
    for plot in plots {
        let svg = std::fs::read_to_string(out.join(plot["file"].as_str().expect("file")))
            .expect("the plot");
        assert!(
            svg.starts_with("<svg") && svg.contains("<polyline"),
            "{plot}"
        );
    }

    let md = std::fs::read_to_string(&markdown).expect("the markdown");
    assert!(
        md.starts_with("# Benchmarks\n\nprose\n"),
        "prose before the block is kept"
    );
    assert!(
        md.ends_with("<!-- bench:end -->\n\nmore prose\n"),
        "prose after the block is kept"
    );
    assert!(!md.contains("\nold\n"), "the old results are replaced");
    assert!(md.contains("| Commands, 64 clients | commands/s |"));
    assert!(md.contains("![Command latency distribution"));
    let _ = std::fs::remove_dir_all(&out);
}
