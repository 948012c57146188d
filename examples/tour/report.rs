//! The timing tables' JSON, shared by the tour's tables and the tuning sweep.
//!
//! A GPU machine's time is short and a run may be cut off by a time limit,
//! so the report is written again after each table, with the seconds each
//! one took: a run cut short keeps every table it finished, and says which it
//! did not reach. A table that fails is printed and recorded as
//! `{"error": ...}`, the tables after it still run, and the run fails at the
//! end. `--tables a,b` runs only the named tables: a second, shorter run for
//! what a first one did not reach.
use std::time::Instant;

use serde_json::{Value, json};

use crate::Res;

/// One table: its name (the JSON key, and what `--tables` names) and what
/// makes its rows.
pub type Table<'a> = (String, Box<dyn FnOnce() -> Res<Value> + 'a>);

/// A table named `name` whose rows `make` returns.
pub fn table<'a, T: Into<Value>>(name: &str, make: impl FnOnce() -> Res<T> + 'a) -> Table<'a> {
    (name.to_string(), Box::new(move || make().map(Into::into)))
}

/// The names `--tables a,b` gives on the command line, if it is there.
pub fn selection(args: &[String]) -> Res<Option<Vec<String>>> {
    let Some(at) = args.iter().position(|a| a == "--tables") else {
        return Ok(None);
    };
    let names = args
        .get(at + 1)
        .ok_or("--tables needs a comma-separated list of table names")?;
    Ok(Some(names.split(',').map(str::to_string).collect()))
}

pub struct Report {
    pub path: String,
    entries: serde_json::Map<String, Value>,
    failed: Vec<String>,
}

impl Report {
    /// Runs `tables` (those `only` names, if given) one after another into a
    /// report at `path` that starts with `head`'s entries (the run's GPU and
    /// ceilings) and the names of the tables planned (`tables_planned`).
    /// A name in `only` that no table has is an error before anything runs.
    pub fn run(
        path: String,
        head: &[(&str, Value)],
        tables: Vec<Table<'_>>,
        only: Option<&[String]>,
    ) -> Res<Report> {
        let names: Vec<String> = tables.iter().map(|(name, _)| name.clone()).collect();
        if let Some(unknown) = only.into_iter().flatten().find(|n| !names.contains(n)) {
            return Err(format!(
                "--tables: no table is named `{unknown}`; the tables: {}",
                names.join(", ")
            )
            .into());
        }
        let planned: Vec<String> = names
            .into_iter()
            .filter(|name| only.is_none_or(|o| o.contains(name)))
            .collect();
        let mut entries: serde_json::Map<String, Value> = head
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        entries.insert("tables_planned".into(), json!(planned));
        entries.insert("table_seconds".into(), json!({}));
        let mut report = Report {
            path,
            entries,
            failed: Vec::new(),
        };
        report.write()?;
        for (name, make) in tables {
            if planned.contains(&name) {
                report.add(&name, make)?;
            }
        }
        println!("\n   written: {}", report.path);
        Ok(report)
    }

    fn add(&mut self, name: &str, make: Box<dyn FnOnce() -> Res<Value> + '_>) -> Res<()> {
        let start = Instant::now();
        let value = match make() {
            Ok(rows) => rows,
            Err(e) => {
                println!("   {name}: failed: {e}");
                self.failed.push(name.to_string());
                json!({ "error": e.to_string() })
            }
        };
        let seconds = start.elapsed().as_secs_f64();
        println!("   ({name}: {seconds:.1} s)");
        self.entries["table_seconds"][name] = json!(seconds);
        self.entries.insert(name.to_string(), value);
        self.write()
    }

    fn write(&self) -> Res<()> {
        std::fs::write(&self.path, serde_json::to_string_pretty(&self.entries)?)?;
        Ok(())
    }

    /// Fails the run (exit status 1) if a table failed, after saying which.
    pub fn exit_if_failed(&self) {
        if !self.failed.is_empty() {
            eprintln!(
                "\ntour: some timing tables failed: {}",
                self.failed.join(", ")
            );
            std::process::exit(1);
        }
    }
}
