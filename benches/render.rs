//! Rendering cost at 100, 2,000 and 10,000 services × 10 instances: screen the raw pairs, parse
//! the registry, render the default template. `cargo bench --bench render` prints the median and
//! the best of several runs per stage; no assertion, figures go to the README.

use std::sync::Arc;
use std::time::{Duration, Instant};

use haconfd::config::Config;
use haconfd::model::{Registry, Snapshot};
use haconfd::render::Templates;

fn config() -> Config {
    let text = format!(
        r#"
[source]
kind = "file"
[file]
path = "unused.yaml"
[[template]]
name = "haproxy"
src = "{}"
dest = "/tmp/haconfd-bench.cfg"
[haproxy]
mode = "none"
[frontend]
bind = ["127.0.0.1:18080"]
"#,
        // Another template can be measured with HACONFD_BENCH_TEMPLATE=path.
        std::env::var("HACONFD_BENCH_TEMPLATE").unwrap_or_else(|_| format!(
            "{}/templates/haproxy.cfg.tera",
            env!("CARGO_MANIFEST_DIR")
        ))
    );
    match Config::parse(&text, "bench") {
        Ok(c) => c,
        Err(e) => panic!("bench config: {e}"),
    }
}

fn template_text() -> String {
    let path = std::env::var("HACONFD_BENCH_TEMPLATE")
        .unwrap_or_else(|_| format!("{}/templates/haproxy.cfg.tera", env!("CARGO_MANIFEST_DIR")));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn pairs(services: usize, instances: usize) -> Vec<(String, String)> {
    let mut out = Vec::with_capacity(services * instances);
    for s in 0..services {
        for i in 0..instances {
            let port = 10_000 + (s * instances + i) % 50_000;
            out.push((
                format!("/services/svc-{s:05}/inst-{i:02}"),
                format!("127.0.{}.{}:{port}", (s / 250) % 250, s % 250 + 1),
            ));
        }
    }
    out
}

fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, Duration, T) {
    let mut times = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs {
        let t = Instant::now();
        last = Some(f());
        times.push(t.elapsed());
    }
    times.sort();
    let out = match last {
        Some(v) => v,
        None => panic!("runs must be > 0"),
    };
    (times[times.len() / 2], times[0], out)
}

fn main() {
    let config = config();
    let prefixes = config.source.prefixes.clone();
    let mut templates = match Templates::load(&config) {
        Ok(t) => t,
        Err(e) => panic!("templates: {e}"),
    };
    println!("stage                 services×inst   median      best   output");
    for (services, runs) in [(100, 50), (2_000, 15), (10_000, 5)] {
        let raw = pairs(services, 10);
        let (m, b, (snap, _)) = time(runs, || {
            Snapshot::screen(1, &prefixes, raw.iter().map(|(k, v)| (k, v)))
        });
        println!(
            "screen                {services:>6}×10 {:>9.2?} {:>9.2?}",
            m, b
        );
        let snap = Arc::new(snap);
        let (m, b, (registry, rejected)) = time(runs, || Registry::parse(&snap));
        assert!(rejected.is_empty());
        println!(
            "parse registry        {services:>6}×10 {:>9.2?} {:>9.2?}",
            m, b
        );
        let (m, b, out) = time(runs, || match templates.render_all(&snap, &registry) {
            Ok(r) => r,
            Err(e) => panic!("render: {e}"),
        });
        println!(
            "render default        {services:>6}×10 {:>9.2?} {:>9.2?}   {} KiB",
            m,
            b,
            out[0].bytes.len() / 1024
        );
        // One instance changes between renders: what the daemon does per event (parse cache,
        // stable slots, tera value cache). Two snapshots that differ in one value alternate.
        let other = {
            let mut o = (*snap).clone();
            o.kv.insert(
                "/services/svc-00000/inst-00".into(),
                "127.0.0.1:9999".into(),
            );
            Arc::new(o)
        };
        let mut cache = haconfd::model::ParseCache::default();
        let mut slots = haconfd::slots::Slots::default();
        let mut flip = false;
        let (m, b, _) = time(runs, || {
            flip = !flip;
            let current = if flip { &other } else { &snap };
            let (mut registry, _) = Registry::parse_cached(current, &mut cache);
            slots.assign_adopting(&mut registry, 4, false, |p, s| cache.adopt(p, s));
            match templates.render_all(current, &registry) {
                Ok(r) => r,
                Err(e) => panic!("render: {e}"),
            }
        });
        println!(
            "one change, cached    {services:>6}×10 {:>9.2?} {:>9.2?}",
            m, b
        );
        // The structural check, part of every render above: every line of the output read for
        // a guarded directive.
        let allowed = haconfd::render::structure::count(&template_text());
        let text = String::from_utf8_lossy(&out[0].bytes).into_owned();
        let (m, b, _) = time(runs * 4, || {
            haconfd::render::structure::check(&allowed, &text).is_ok()
        });
        println!(
            "structural check      {services:>6}×10 {:>9.2?} {:>9.2?}",
            m, b
        );
    }
}
