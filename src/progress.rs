//! The progress bar shared by the long-running loops (perplexity, sensitivity, task suites).

#![warn(missing_docs)]

/// A bar of `len` steps labelled `prefix`; hidden when `show` is false.
pub fn bar(len: u64, prefix: &str, show: bool) -> indicatif::ProgressBar {
    let bar = if show {
        indicatif::ProgressBar::new(len).with_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} {bar:40} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .expect("static template"),
        )
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_prefix(prefix.to_string());
    bar
}
