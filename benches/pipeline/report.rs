//! How figures are reported: each phase returns a struct implementing `Figures`; the report
//! turns it into table rows (measured, target, ratio to a ceiling, met) and a JSON section.

use std::fs;
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::ceiling::Ceilings;
use crate::round;

/// What a phase measured.
pub trait Figures {
    /// Rows of the table, with targets and ratios against `ceilings` (same run).
    fn rows(&self, ceilings: &Ceilings) -> Vec<Row>;
    /// Everything measured, including the evidence (CPU per process, wait events).
    fn json(&self) -> Value;
}

/// One line of the table.
pub struct Row {
    pub figure: String,
    pub value: f64,
    pub unit: &'static str,
    /// A few words beside the value (percentiles, counts).
    pub detail: String,
    pub target: String,
    /// (ceiling or reference name, its value, value / it).
    pub ratio: Option<(String, f64, f64)>,
    pub met: Option<bool>,
}

impl Row {
    /// A figure with no target.
    pub fn info(figure: impl Into<String>, value: f64, unit: &'static str) -> Row {
        Row {
            figure: figure.into(),
            value,
            unit,
            detail: String::new(),
            target: "-".into(),
            ratio: None,
            met: None,
        }
    }

    /// A figure that must stay at or below `max`.
    pub fn at_most(figure: impl Into<String>, value: f64, unit: &'static str, max: f64) -> Row {
        Row {
            target: format!("<= {max}"),
            met: Some(value.is_finite() && value <= max),
            ..Row::info(figure, value, unit)
        }
    }

    /// A figure that must reach at least `min` × the reference `name` (absent: not judged).
    pub fn ratio(
        figure: impl Into<String>,
        value: f64,
        unit: &'static str,
        name: &str,
        reference: Option<f64>,
        min: f64,
    ) -> Row {
        let ratio = reference.map(|r| (name.to_string(), r, value / r));
        Row {
            target: format!(">= {min} x {name}"),
            met: ratio.as_ref().map(|(_, _, x)| *x >= min),
            ratio,
            ..Row::info(figure, value, unit)
        }
    }

    /// A ratio against a ceiling measured in this run.
    pub fn ceiling(
        figure: impl Into<String>,
        value: f64,
        unit: &'static str,
        c: &Ceilings,
        key: &str,
        min: f64,
    ) -> Row {
        Row::ratio(figure, value, unit, key, c.get(key), min)
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Row {
        self.detail = detail.into();
        self
    }

    fn json(&self) -> Value {
        json!({
            "figure": self.figure,
            "value": self.value.is_finite().then(|| round(self.value, 3)),
            "unit": self.unit, "detail": self.detail, "target": self.target,
            "ratio": self.ratio.as_ref().map(|(k, r, x)| json!({"to": k, "reference": round(*r, 1), "ratio": round(*x, 3)})),
            "met": self.met,
        })
    }
}

/// Rows and JSON sections of every phase that ran.
#[derive(Default)]
pub struct Report {
    pub rows: Vec<(String, Row)>,
    pub sections: Map<String, Value>,
}

impl Report {
    pub fn add(&mut self, phase: &str, figures: &dyn Figures, ceilings: &Ceilings) {
        for r in figures.rows(ceilings) {
            self.rows.push((phase.to_string(), r));
        }
        self.sections.insert(phase.to_string(), figures.json());
    }

    pub fn print(&self) {
        println!();
        println!(
            "{:<10} {:<40} {:>11} {:<5} {:<26} {:<34} {:<3} detail",
            "phase", "figure", "value", "unit", "target", "ratio", "met"
        );
        println!("{}", "-".repeat(150));
        for (phase, r) in &self.rows {
            let ratio = match &r.ratio {
                Some((k, c, x)) => format!("{x:.2} of {k} ({c:.0})"),
                None => "-".into(),
            };
            let met = match r.met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "-",
            };
            println!(
                "{:<10} {:<40} {:>11} {:<5} {:<26} {:<34} {:<3} {}",
                phase,
                r.figure,
                format!("{:.2}", r.value),
                r.unit,
                r.target,
                ratio,
                met,
                r.detail
            );
        }
    }

    pub fn write_json(&self, path: &Path, header: Value) {
        let mut v = header;
        v["phases"] = Value::Object(self.sections.clone());
        v["table"] = Value::Array(
            self.rows
                .iter()
                .map(|(p, r)| {
                    let mut j = r.json();
                    j["phase"] = json!(p);
                    j
                })
                .collect(),
        );
        if let Some(dir) = path.parent() {
            let _ = fs::create_dir_all(dir);
        }
        fs::write(path, serde_json::to_string_pretty(&v).unwrap())
            .expect("writing the JSON report");
        println!("JSON: {}", path.display());
    }
}
