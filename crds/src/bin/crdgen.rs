//! Writes one YAML file per CRD, `<plural>.tern.dev.yaml`, into the directory
//! given as the only argument (`crds/manifests` in this repository).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let dir = match (args.next(), args.next()) {
        (Some(dir), None) if dir != "--help" && dir != "-h" => PathBuf::from(dir),
        _ => {
            eprintln!("usage: crdgen <output-dir>\n\nWrites tern's CRDs as <plural>.tern.dev.yaml into <output-dir>.");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("crdgen: cannot create {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    for crd in tern_crds::all_crds() {
        let path = dir.join(tern_crds::manifest_file_name(&crd));
        if let Err(e) = std::fs::write(&path, tern_crds::manifest_yaml(&crd)) {
            eprintln!("crdgen: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}
