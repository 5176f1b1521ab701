//! The import workloads: what node and Python import, the one-line programs that time it from
//! inside the process, and the samples they report.

use std::ffi::OsString;
use std::process::Output;

use crate::stats::{Series, human};

/// The heavy packages node `require`s (all in the workload's package.json).
const NODE_MODULES: &[&str] = &[
    "react",
    "react-dom",
    "typescript",
    "webpack",
    "eslint",
    "@babel/core",
    "@babel/preset-env",
    "lodash",
    "express",
    "axios",
    "rxjs",
    "jest-cli",
    "prettier",
];

/// The heavy modules Python imports (all in the workload's requirements.txt).
const PYTHON_MODULES: &[&str] = &[
    "numpy",
    "pandas",
    "scipy.stats",
    "pyarrow",
    "sklearn.linear_model",
    "matplotlib.pyplot",
    "sympy",
    "jupyterlab",
    "statsmodels.api",
];

/// A language whose imports are timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    /// `node -e …` in the project (resolves `node_modules` from the working directory).
    Node,
    /// `.venv/bin/python -c …` in the project.
    Python,
}

impl Lang {
    /// The name printed.
    pub fn name(self) -> &'static str {
        match self {
            Lang::Node => "node",
            Lang::Python => "python",
        }
    }

    /// What is imported, as printed.
    pub fn modules(self) -> String {
        match self {
            Lang::Node => NODE_MODULES.join(", "),
            Lang::Python => PYTHON_MODULES.join(", "),
        }
    }

    /// The command line: it imports the modules and prints `WALL_MS CPU_MS SYS_MS` of the
    /// imports alone (the interpreter's own start-up is not in the figure).
    pub fn argv(self) -> Vec<OsString> {
        match self {
            Lang::Node => self.argv_of(NODE_MODULES),
            Lang::Python => self.argv_of(PYTHON_MODULES),
        }
    }

    /// Other modules than [`Lang::argv`] imports (many of their dependencies differ), for a
    /// command that reads another part of the tree.
    pub fn other_modules(self) -> &'static [&'static str] {
        match self {
            Lang::Node => NODE_OTHER_MODULES,
            Lang::Python => PYTHON_OTHER_MODULES,
        }
    }

    /// The command line that imports `modules` and prints its times (see [`Lang::argv`]).
    pub fn argv_of(self, modules: &[&str]) -> Vec<OsString> {
        match self {
            Lang::Node => vec!["node".into(), "-e".into(), node_program(modules).into()],
            Lang::Python => vec![
                ".venv/bin/python".into(),
                "-c".into(),
                python_program(modules).into(),
            ],
        }
    }
}

/// Node modules of the workload that [`NODE_MODULES`] does not import.
const NODE_OTHER_MODULES: &[&str] = &[
    "jsdom",
    "postcss",
    "terser",
    "rollup",
    "webpack-dev-server",
    "workbox-build",
    "html-webpack-plugin",
    "core-js",
];

/// Python modules of the workload that [`PYTHON_MODULES`] does not import.
const PYTHON_OTHER_MODULES: &[&str] = &[
    "flask",
    "sqlalchemy",
    "boto3",
    "IPython",
    "bs4",
    "requests",
    "tornado",
    "pydantic",
    "yaml",
];

fn node_program(modules: &[&str]) -> String {
    let list = modules
        .iter()
        .map(|m| format!("'{m}'"))
        .collect::<Vec<_>>()
        .join(",");
    format!(
        "const t0 = process.hrtime.bigint(), c0 = process.cpuUsage();\n\
         for (const m of [{list}]) require(m);\n\
         const c = process.cpuUsage(c0);\n\
         console.log(`${{Number(process.hrtime.bigint() - t0) / 1e6}} ${{(c.user + c.system) / 1e3}} ${{c.system / 1e3}}`);"
    )
}

fn python_program(modules: &[&str]) -> String {
    format!(
        "import time, resource\n\
         def cpu():\n    r = resource.getrusage(resource.RUSAGE_SELF)\n    return r.ru_utime + r.ru_stime, r.ru_stime\n\
         t0 = time.perf_counter(); c0, s0 = cpu()\n\
         import {}\n\
         c1, s1 = cpu()\n\
         print((time.perf_counter() - t0) * 1e3, (c1 - c0) * 1e3, (s1 - s0) * 1e3)",
        modules.join(", ")
    )
}

/// What one timed import reported: wall, CPU (user + system) and system time, in ms.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Wall time of the imports.
    pub wall_ms: f64,
    /// CPU time (user + system) of the imports.
    pub cpu_ms: f64,
    /// System (kernel) time of the imports.
    pub sys_ms: f64,
}

impl Sample {
    /// Parses the program's last output line.
    pub fn parse(out: &Output) -> Self {
        let text = String::from_utf8_lossy(&out.stdout);
        let fields: Vec<f64> = text
            .lines()
            .last()
            .unwrap_or_default()
            .split_whitespace()
            .map(|f| f.parse().expect("the import program prints three numbers"))
            .collect();
        assert_eq!(fields.len(), 3, "unexpected import output: {text}");
        Self {
            wall_ms: fields[0],
            cpu_ms: fields[1],
            sys_ms: fields[2],
        }
    }
}

/// The samples of one side of a comparison.
pub struct Side {
    /// What ran, as printed.
    pub label: String,
    /// Wall time of the imports.
    pub wall: Series,
    /// CPU time of the imports.
    pub cpu: Series,
    /// Kernel time of the imports.
    pub sys: Series,
    /// Read requests the store's block device completed during each run.
    pub reads: Vec<u64>,
}

impl Side {
    /// No samples yet.
    pub fn new(label: &str) -> Self {
        Self {
            label: label.to_owned(),
            wall: Series::new(label),
            cpu: Series::new(label),
            sys: Series::new(label),
            reads: Vec::new(),
        }
    }

    /// Adds one run.
    pub fn push(&mut self, s: Sample, reads: u64) {
        self.wall.push_ms(s.wall_ms);
        self.cpu.push_ms(s.cpu_ms);
        self.sys.push_ms(s.sys_ms);
        self.reads.push(reads);
    }

    fn median_reads(&self) -> u64 {
        let mut r = self.reads.clone();
        r.sort_unstable();
        r.get(r.len() / 2).copied().unwrap_or(0)
    }
}

/// Prints the sides: wall median (min … max), CPU and kernel-time medians, read requests.
pub fn print_sides(sides: &[&Side]) {
    let width = sides
        .iter()
        .map(|s| s.label.chars().count())
        .max()
        .unwrap_or(0);
    println!(
        "  {:<width$}  {:>4}  {:>10}  {:>21}  {:>10}  {:>10}  {:>6}",
        "imports on", "runs", "median", "min … max", "cpu", "of it sys", "reads"
    );
    for s in sides {
        println!(
            "  {:<width$}  {:>4}  {:>10}  {:>21}  {:>10}  {:>10}  {:>6}",
            s.label,
            s.wall.len(),
            human(s.wall.median()),
            format!("{} … {}", human(s.wall.min()), human(s.wall.max())),
            human(s.cpu.median()),
            human(s.sys.median()),
            s.median_reads()
        );
    }
}
