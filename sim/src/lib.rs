//! sim: the digital twin.
