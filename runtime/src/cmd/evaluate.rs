//! `branchpoint evaluate`: per-exit test metrics of a model, beside the
//! numbers its model card recorded at training time.
use anyhow::{Context, Result};
use branchpoint_models::card::NamedExitMetrics;
use branchpoint_models::metrics::exit_metrics;
use branchpoint_models::{load_model, Dataset};

use crate::cli::EvaluateArgs;
use crate::{parse_device, set_threads};

pub fn run(args: EvaluateArgs) -> Result<()> {
    let device = parse_device(&args.compute.device)?;
    set_threads(args.compute.threads)?;
    let model = load_model(&args.model, device)?;
    let card = &model.card;
    let kind = card.dataset.name;
    let data_dir = args.data_dir.clone().unwrap_or_else(|| kind.default_dir());
    let data = Dataset::load(kind, &data_dir, card.dataset.split.validation, card.dataset.split.seed)?;

    let logits = model.net.logits_for(&data.test.images, 500);
    let names = model.net.architecture().exit_names();
    let measured: Vec<NamedExitMetrics> = names
        .iter()
        .zip(&logits)
        .map(|(name, z)| NamedExitMetrics { exit: name.clone(), metrics: exit_metrics(z, &data.test.labels) })
        .collect();

    println!(
        "model {} ({}, {}), test set: {} inputs",
        args.model.display(),
        model.card.architecture.name,
        kind.name(),
        data.test.len()
    );
    println!("  {:<9} {:>10} {:>8} {:>8} {:>15}", "exit", "accuracy", "NLL", "ECE", "card accuracy");
    let n = data.test.len() as f64;
    let mut differing = 0;
    for (m, c) in measured.iter().zip(&card.test_metrics) {
        // Accuracies are counts over the same inputs: compare them as counts.
        let same = (m.metrics.accuracy * n).round() == (c.metrics.accuracy * n).round();
        differing += usize::from(!same);
        println!(
            "  {:<9} {:>8.2} % {:>8.4} {:>8.4} {:>13.2} %{}",
            m.exit,
            100.0 * m.metrics.accuracy,
            m.metrics.nll,
            m.metrics.ece,
            100.0 * c.metrics.accuracy,
            if same { "" } else { "  (differs)" }
        );
    }
    if differing == 0 {
        println!("every exit's accuracy equals the model card's");
    } else {
        println!("{differing} exit(s) differ from the model card (another libtorch build or CPU can flip a few near-ties)");
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&measured)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        println!("metrics written to {}", path.display());
    }
    Ok(())
}
