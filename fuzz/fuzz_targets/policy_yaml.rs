//! The policy loader: any bytes as a policy file must give a policy set or located errors.
#![no_main]

use libfuzzer_sys::fuzz_target;
use toolgate::policy::compile::{SourceFile, compile};

fuzz_target!(|data: &[u8]| {
    let files = [SourceFile { name: "fuzz.yaml".into(), bytes: data.to_vec() }];
    if let Err(errors) = compile(&files, &Default::default()) {
        assert!(errors.iter().all(|e| e.file == "fuzz.yaml" || e.file.is_empty()));
    }
});
