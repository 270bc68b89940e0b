//! forecast: per-class load forecasts with calibrated intervals (MSTL + ETS
//! via augurs, with seasonal-naive and EWMA fallbacks) and their backtests.
//! Pure: takes plain series, does no I/O.
#![forbid(unsafe_code)]
