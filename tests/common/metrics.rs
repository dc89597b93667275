//! `/metrics` scraped and parsed (Prometheus text format), for tests that check a series moved.

use std::collections::HashMap;

use super::Server;

/// One scrape: every sample by its full series name (`name{labels}`, labels as rendered).
pub struct Scrape(pub HashMap<String, f64>);

impl Scrape {
    pub async fn of(server: &Server) -> Scrape {
        let resp = server.api().get_ok("/metrics").await;
        Scrape::parse(resp.body.as_str().expect("a text body"))
    }

    /// Prometheus text format: `# HELP`/`# TYPE` comments, then `series value` lines.
    pub fn parse(text: &str) -> Scrape {
        let mut samples = HashMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("a sample line: series value");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("a number in {line}"));
            assert!(
                series.starts_with("beach_road_"),
                "a series without the prefix: {line}"
            );
            samples.insert(series.to_owned(), value);
        }
        Scrape(samples)
    }

    /// The value of `name` with exactly these labels (any order), 0 when absent.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(series, _)| matches(series, name, labels))
            .map(|(_, v)| *v)
            .sum()
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.keys().any(|series| base(series) == name)
    }
}

pub fn base(series: &str) -> &str {
    series.split('{').next().unwrap_or(series)
}

/// `series` is `name` and carries every one of `labels`.
fn matches(series: &str, name: &str, labels: &[(&str, &str)]) -> bool {
    base(series) == name
        && labels
            .iter()
            .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
}
