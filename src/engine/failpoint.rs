//! Points where the fault-injection tests make the process die, as SIGKILL would
//! (`FAILPOINTS="<name>=<n>*off->return"`: pass `n` times, then abort). Inert unless that variable
//! names the point.

/// Aborts the process here when the fail point `name` fires.
pub fn crash_point(name: &str) {
    if fail::eval(name, |_| ()).is_some() {
        std::process::abort();
    }
}
