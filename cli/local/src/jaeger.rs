//! Jaeger v2 (built from its Go module by e2e/build-tools.sh), started with a
//! minimal configuration on ports from the OS: OTLP/gRPC in, memory storage,
//! and the query API (`/api/v3/traces/{id}`) out.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::process::ChildGuard;
use crate::{LocalError, Result, assets};

pub struct Jaeger {
    /// OTLP/gRPC endpoint, `http://127.0.0.1:port`.
    pub otlp_endpoint: String,
    /// Query HTTP address (UI placeholder and `/api/v3`).
    pub query: SocketAddr,
    process: ChildGuard,
}

impl Jaeger {
    /// Whether the Jaeger binary was built.
    pub fn available() -> bool {
        assets::binary("jaeger").is_ok()
    }

    pub fn start(dir: &Path) -> Result<Self> {
        let binary = assets::binary("jaeger")?;
        let otlp = assets::free_port();
        let query = assets::free_port();
        let query_grpc = assets::free_port();
        let health = assets::free_port();
        let config = format!(
            "service:
  extensions: [jaeger_storage, jaeger_query, healthcheckv2]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  healthcheckv2:
    use_v2: true
    http:
      endpoint: 127.0.0.1:{health}
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: 127.0.0.1:{query}
    grpc:
      endpoint: 127.0.0.1:{query_grpc}
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 10000
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{otlp}
processors:
  batch:
    timeout: 200ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"
        );
        let config_path = dir.join("jaeger.yaml");
        std::fs::write(&config_path, config).map_err(|source| LocalError::Io {
            path: config_path.display().to_string(),
            source,
        })?;
        let mut cmd = Command::new(binary);
        cmd.arg(format!("--config={}", config_path.display()));
        let mut process = ChildGuard::spawn("jaeger", cmd, &dir.join("jaeger.log"))?;
        let url = format!("http://127.0.0.1:{query}/api/v3/services");
        process.wait_until(Duration::from_secs(60), || crate::http::get_ok(&url))?;
        Ok(Self {
            otlp_endpoint: format!("http://127.0.0.1:{otlp}"),
            query: SocketAddr::from(([127, 0, 0, 1], query)),
            process,
        })
    }

    /// The body of `/api/v3/traces/{trace_id}` (hex id), if Jaeger has it.
    pub async fn trace(&self, trace_id: &str) -> Option<String> {
        crate::http::http_get(self.query, &format!("/api/v3/traces/{trace_id}")).await
    }

    pub fn log(&self) -> String {
        self.process.log_tail()
    }
}

/// The spans of a `/api/v3/traces/{id}` answer (OTLP JSON).
pub fn parse_trace(body: &str) -> Vec<crate::otlp::ReceivedSpan> {
    use serde_json::Value;
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let text = |v: &Value| -> String {
        match v {
            Value::Object(m) => m
                .values()
                .next()
                .map(|x| match x {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .unwrap_or_default(),
            _ => String::new(),
        }
    };
    let hex = |v: &Value| -> Vec<u8> {
        let s = v.as_str().unwrap_or_default();
        (0..s.len() / 2)
            .filter_map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
            .collect()
    };
    let nanos = |v: &Value| -> u64 {
        match v {
            Value::String(s) => s.parse().unwrap_or(0),
            Value::Number(n) => n.as_u64().unwrap_or(0),
            _ => 0,
        }
    };
    let mut out = Vec::new();
    let empty = Vec::new();
    for rs in v["result"]["resourceSpans"].as_array().unwrap_or(&empty) {
        let instance = rs["resource"]["attributes"]
            .as_array()
            .and_then(|a| a.iter().find(|kv| kv["key"] == "service.instance.id"))
            .map(|kv| text(&kv["value"]))
            .unwrap_or_default();
        for ss in rs["scopeSpans"].as_array().unwrap_or(&empty) {
            for s in ss["spans"].as_array().unwrap_or(&empty) {
                out.push(crate::otlp::ReceivedSpan {
                    name: s["name"].as_str().unwrap_or_default().to_string(),
                    trace_id: hex(&s["traceId"]),
                    span_id: hex(&s["spanId"]),
                    parent_span_id: hex(&s["parentSpanId"]),
                    start_ns: nanos(&s["startTimeUnixNano"]),
                    end_ns: nanos(&s["endTimeUnixNano"]),
                    instance: instance.clone(),
                    // Jaeger does not say who exported a span.
                    exporter_identities: Vec::new(),
                    attributes: s["attributes"]
                        .as_array()
                        .unwrap_or(&empty)
                        .iter()
                        .map(|kv| (kv["key"].as_str().unwrap_or_default().to_string(), text(&kv["value"])))
                        .collect(),
                });
            }
        }
    }
    out
}
