//! Hand-written or a crate: ns per operation of relayd's token buckets
//! against governor's keyed limiter, and of the metrics text against
//! prometheus-client's encoder, on whatever machine runs it.

use std::hint::black_box;
use std::num::NonZeroU32;
use std::time::Instant;

/// Prints the mean time of `f` over `n` calls.
pub fn per_op(label: &str, n: u64, mut f: impl FnMut(u64)) {
    let t = Instant::now();
    for i in 0..n {
        f(i);
    }
    let ns = t.elapsed().as_nanos() as f64 / n as f64;
    println!("{label:<60} {ns:>8.1} ns/op");
}

/// Keyed token buckets: relayd's against governor's, `n` takes each.
pub fn buckets(n: u64) {
    let keys: Vec<String> = (0..1000).map(|i| format!("user-{i}")).collect();
    // Hand-written keyed token buckets (relayd::admission::Buckets).
    let ours = relayd::admission::Buckets::<String>::per_minute(600, 600);
    per_op("ours: Buckets::take, 1 key", n, |_| {
        black_box(ours.take(keys[0].as_str(), Instant::now()));
    });
    let ours = relayd::admission::Buckets::<String>::per_minute(600, 600);
    per_op("ours: Buckets::take, 1000 keys", n, |i| {
        black_box(ours.take(keys[(i % 1000) as usize].as_str(), Instant::now()));
    });
    // governor's keyed GCRA limiter, std-only features (a Mutex<HashMap>).
    let quota = governor::Quota::per_minute(NonZeroU32::new(600).unwrap());
    let gov = governor::RateLimiter::hashmap(quota);
    per_op("governor: check_key, 1 key", n, |_| {
        black_box(gov.check_key(&keys[0]).is_ok());
    });
    let gov = governor::RateLimiter::hashmap(quota);
    per_op("governor: check_key, 1000 keys", n, |i| {
        black_box(gov.check_key(&keys[(i % 1000) as usize]).is_ok());
    });
}

/// Metrics text, 10 families: ours against prometheus-client, `n`
/// scrapes each.
pub fn metrics(n: u64) {
    // Metrics text: 10 families rendered at scrape time.
    let values: Vec<u64> = (0..10).collect();
    per_op("ours: Exposition, 10 families", n, |i| {
        let mut out = daemon::metrics::Exposition::new();
        for (k, v) in values.iter().enumerate() {
            if k % 2 == 0 {
                out.gauge(NAMES[k], "Some help text for the family.", v + i);
            } else {
                out.counter(NAMES[k], "Some help text for the family.", v + i);
            }
        }
        black_box(out.finish());
    });
    use prometheus_client::metrics::counter::ConstCounter;
    use prometheus_client::metrics::gauge::ConstGauge;
    #[derive(Debug)]
    struct Live(u64);
    impl prometheus_client::collector::Collector for Live {
        fn encode(
            &self,
            mut enc: prometheus_client::encoding::DescriptorEncoder,
        ) -> Result<(), std::fmt::Error> {
            use prometheus_client::encoding::EncodeMetric;
            for k in 0..10usize {
                let v = k as u64 + self.0;
                if k % 2 == 0 {
                    let g = ConstGauge::new(v as i64);
                    let m = enc.encode_descriptor(
                        NAMES[k],
                        "Some help text for the family.",
                        None,
                        g.metric_type(),
                    )?;
                    g.encode(m)?;
                } else {
                    let c = ConstCounter::new(v);
                    let m = enc.encode_descriptor(
                        NAMES[k].trim_end_matches("_total"),
                        "Some help text for the family.",
                        None,
                        c.metric_type(),
                    )?;
                    c.encode(m)?;
                }
            }
            Ok(())
        }
    }
    per_op("prometheus-client: Collector + encode, 10 families", n, |i| {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(Live(i)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        black_box(text);
    });
}


const NAMES: [&str; 10] = [
    "relayd_a",
    "relayd_b_total",
    "relayd_c",
    "relayd_d_total",
    "relayd_e",
    "relayd_f_total",
    "relayd_g",
    "relayd_h_total",
    "relayd_i",
    "relayd_j_total",
];
