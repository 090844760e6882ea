//! `GET /metrics`: the engine's counters in Prometheus' text format.

use crate::infer::metrics::Histogram;
use crate::serve::AppState;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

pub async fn render(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let m = &state.engine.metrics;
    let mut out = String::new();
    let gauges = [
        (
            "engine_requests_running",
            "Requests in the running batch.",
            &m.requests_running,
        ),
        (
            "engine_requests_waiting",
            "Requests waiting to be admitted.",
            &m.requests_waiting,
        ),
        (
            "engine_kv_blocks_total",
            "KV-cache blocks in the pool.",
            &m.kv_blocks_total,
        ),
        (
            "engine_kv_blocks_free",
            "KV-cache blocks no request uses.",
            &m.kv_blocks_free,
        ),
    ];
    for (name, help, v) in gauges {
        metric(&mut out, name, help, "gauge", v.load(Relaxed));
    }
    let used = m.kv_blocks_total.load(Relaxed) - m.kv_blocks_free.load(Relaxed);
    metric(
        &mut out,
        "engine_kv_blocks_used",
        "KV-cache blocks in use.",
        "gauge",
        used,
    );
    let counters = [
        (
            "engine_requests_finished_total",
            "Requests that finished.",
            &m.requests_finished,
        ),
        (
            "engine_prompt_tokens_total",
            "Prompt tokens of admitted requests.",
            &m.prompt_tokens,
        ),
        (
            "engine_generation_tokens_total",
            "Tokens generated.",
            &m.generation_tokens,
        ),
        (
            "engine_prefix_cache_queries_total",
            "Prompt tokens looked up in the prefix cache.",
            &m.prefix_queried_tokens,
        ),
        (
            "engine_prefix_cache_hits_total",
            "Prompt tokens found in the prefix cache.",
            &m.prefix_hit_tokens,
        ),
    ];
    for (name, help, v) in counters {
        metric(&mut out, name, help, "counter", v.load(Relaxed));
    }
    let (q, h) = (
        m.prefix_queried_tokens.load(Relaxed),
        m.prefix_hit_tokens.load(Relaxed),
    );
    let rate = if q == 0 { 0.0 } else { h as f64 / q as f64 };
    let _ = writeln!(
        out,
        "# HELP engine_prefix_cache_hit_rate Share of prompt tokens found in the prefix cache.\n\
         # TYPE engine_prefix_cache_hit_rate gauge\nengine_prefix_cache_hit_rate {rate}"
    );
    histogram(
        &mut out,
        "engine_time_to_first_token_seconds",
        "Time from a request's arrival to its first token.",
        &m.time_to_first_token,
    );
    histogram(
        &mut out,
        "engine_inter_token_latency_seconds",
        "Time between a request's successive tokens.",
        &m.inter_token_latency,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

fn metric(out: &mut String, name: &str, help: &str, kind: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    let (cumulative, count, sum) = h.snapshot();
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (bound, c) in h.bounds.iter().zip(cumulative) {
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {c}");
    }
    let _ = writeln!(
        out,
        "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {sum}\n{name}_count {count}"
    );
}
