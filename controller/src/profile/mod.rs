//! Profiles: the table the controller learns the hardware from (measured by
//! `dynamollm profile` on the twin or a real engine) and its interpolation.

pub mod table;

pub use table::{Estimate, ProfileError, ProfileIssue, ProfileRow, ProfileTable, Severity, Unloaded};
