//! The crate's error type: what was wrong with the input or the model, and
//! what to do about it.

/// Everything that can go wrong when fitting, predicting or backtesting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The series has no usable value (empty, or only NaN/negative/infinite).
    #[error(
        "the series has no usable value ({len} points, none finite and non-negative); give at least one observation"
    )]
    EmptyHistory {
        /// Number of points given.
        len: usize,
    },
    /// A configuration value is out of range.
    #[error("bad forecast configuration: `{field}` {message}")]
    Config {
        /// The offending field.
        field: &'static str,
        /// What is wrong and what is expected.
        message: String,
    },
    /// The history is too short for what was asked.
    #[error("history too short: {what} needs at least {needed_steps} steps, got {got_steps}")]
    TooShort {
        /// What needed the history.
        what: &'static str,
        /// Steps needed.
        needed_steps: usize,
        /// Steps available.
        got_steps: usize,
    },
    /// The MSTL decomposition failed (augurs/stlrs).
    #[error("MSTL decomposition failed: {0}")]
    Mstl(String),
    /// The ETS trend fit failed (augurs-ets).
    #[error("ETS trend fit failed: {0}")]
    Ets(String),
}

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
