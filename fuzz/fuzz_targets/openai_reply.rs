//! A raw HTTP reply of an OpenAI-compatible chat endpoint, read as the MLLM planner reads one
//! (status line, headers, chunked or sized body, JSON, message content, plan line).
#![no_main]

fape_fuzz::capped_allocator!();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = fape_kernels::pipeline::planner::openai::reply_plan_line(data);
});
