//! What the report says about the machine, and processes' resident memory.

use std::process::Command;

/// Resident memory of process `pid` in bytes, from `/proc`; `None` when it is gone.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

fn first_line(program: &str, args: &[&str]) -> Option<String> {
    let output = Command::new(program).args(args).output().ok()?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .next()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
}

/// The machine, toolchain, broker and database, as `(what, description)` pairs.
pub fn machine(broker: &std::path::Path, postgres: &str) -> Vec<(String, String)> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or("unknown".into(), |kb| {
            format!("{:.0} GiB", kb as f64 / 1048576.0)
        });
    let unknown = || "unknown".to_owned();
    vec![
        ("CPU".into(), format!("{cpu}, {cores} cores available")),
        ("Memory".into(), memory),
        (
            "Kernel".into(),
            first_line("uname", &["-sr"]).unwrap_or_else(unknown),
        ),
        (
            "Rust".into(),
            first_line("rustc", &["--version"]).unwrap_or_else(unknown),
        ),
        (
            "Broker".into(),
            first_line(&broker.display().to_string(), &["--version"]).unwrap_or_else(unknown),
        ),
        ("PostgreSQL".into(), postgres.to_owned()),
        (
            "Keel".into(),
            first_line("git", &["rev-parse", "--short", "HEAD"]).unwrap_or_else(unknown),
        ),
    ]
}
