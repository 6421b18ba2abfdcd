//! `PlanLine::parse`, the validator of every planner's answer: any text is an error or a plan
//! whose printed form parses back to itself.
#![no_main]

use fape_kernels::pipeline::planner::PlanLine;

fape_fuzz::capped_allocator!();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(plan) = PlanLine::parse(&text) {
        let again = PlanLine::parse(&plan.to_string());
        assert_eq!(again.ok().as_ref(), Some(&plan), "a parsed plan does not parse back from its Display form");
    }
});
