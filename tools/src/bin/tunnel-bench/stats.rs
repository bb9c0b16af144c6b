//! Percentiles, closed-loop load and plot files shared by the scenarios.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use http::Request;
use http_body_util::BodyExt;

use crate::*;
use tools::svg::{COLORS, Series, cdf};

pub(crate) fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[rank.min(v.len() - 1)]
}

pub(crate) fn median(values: &[f64]) -> f64 {
    percentile(values, 50.0)
}

/// Whole requests, with their latencies.
#[derive(Default)]
pub(crate) struct Load {
    pub(crate) ok: u64,
    pub(crate) errors: u64,
    pub(crate) elapsed: Duration,
    pub(crate) latencies_ms: Vec<f64>,
}

/// `c` clients each sending `make()` back to back for `dur`.
pub(crate) async fn closed_loop(
    http: &Http,
    make: Arc<dyn Fn() -> Request<Body> + Send + Sync>,
    c: usize,
    dur: Duration,
) -> Load {
    let started = Instant::now();
    let deadline = started + dur;
    let mut workers = Vec::with_capacity(c);
    for _ in 0..c {
        let http = http.clone();
        let make = make.clone();
        workers.push(tokio::spawn(async move {
            let mut l = Load::default();
            while Instant::now() < deadline {
                let t = Instant::now();
                let ok = match http.request(make()).await {
                    Ok(resp) => {
                        let good = resp.status().is_success();
                        resp.into_body().collect().await.is_ok() && good
                    }
                    Err(_) => false,
                };
                if ok {
                    l.ok += 1;
                    l.latencies_ms.push(t.elapsed().as_secs_f64() * 1e3);
                } else {
                    l.errors += 1;
                }
            }
            l
        }));
    }
    let mut total = Load::default();
    for w in workers {
        if let Ok(l) = w.await {
            total.ok += l.ok;
            total.errors += l.errors;
            total.latencies_ms.extend(l.latencies_ms);
        }
    }
    total.elapsed = started.elapsed();
    total
}

/// One CDF series per path of `values` (indexed by `route as usize`).
pub(crate) fn cdf_per_path(paths: &[Route], values: &[Vec<f64>; PATHS]) -> Vec<Series> {
    paths
        .iter()
        .map(|p| Series {
            name: p.name().into(),
            color: COLORS[*p as usize],
            points: cdf(&values[*p as usize]),
        })
        .collect()
}

pub(crate) fn write_plot(out: &Path, name: &str, svg: String) -> Result<()> {
    std::fs::write(out.join(name), svg)?;
    Ok(())
}

// ---------------------------------------------------------------- small requests
