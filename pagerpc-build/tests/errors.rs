//! What pagerpc-build does with services it cannot generate, and what it
//! writes for one it can.

use std::path::PathBuf;

/// A fresh directory holding `name` with `text`, and an output directory.
fn project(name: &str, text: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!(
        "pagerpc-build-test-{}-{}",
        std::process::id(),
        name.replace('.', "-")
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("out")).unwrap();
    std::fs::write(dir.join(name), text).unwrap();
    (dir.clone(), dir.join("out"))
}

fn compile(name: &str, text: &str) -> (Result<(), pagerpc_build::Error>, PathBuf) {
    let (dir, out) = project(name, text);
    let r = pagerpc_build::configure()
        .out_dir(&out)
        .emit_rerun_if_changed(false)
        .compile(&[dir.join(name)], &[&dir]);
    (r, out)
}

#[test]
fn clashing_method_names_are_refused_with_the_rpc_named() {
    let (r, _) = compile(
        "clash.proto",
        r#"syntax = "proto3";
package t;
message M {}
service S {
  rpc Get(M) returns (M);
  rpc GetWith(M) returns (M);
}
"#,
    );
    let e = r.unwrap_err();
    assert!(matches!(e, pagerpc_build::Error::Service(_)), "{e:?}");
    let m = e.to_string();
    assert!(
        m.contains("t.S") && m.contains("GetWith") && m.contains("get_with"),
        "{m}"
    );

    let (r, _) = compile(
        "reserved.proto",
        r#"syntax = "proto3";
package t;
message M {}
service S {
  rpc Connect(M) returns (M);
}
"#,
    );
    let m = r.unwrap_err().to_string();
    assert!(m.contains("Connect") && m.contains("`connect`"), "{m}");
}

#[test]
fn an_unknown_payload_direction_is_refused() {
    let (r, _) = compile(
        "bad_option.proto",
        r#"syntax = "proto3";
package t;
import "pagerpc/options.proto";
message M {}
service S {
  rpc Put(M) returns (M) { option (pagerpc.payload) = SIDEWAYS; }
}
"#,
    );
    let e = r.unwrap_err();
    assert!(matches!(e, pagerpc_build::Error::Compile(_)), "{e:?}");
    assert!(e.to_string().contains("SIDEWAYS"), "{e}");
}

#[test]
fn a_missing_file_is_a_compile_error() {
    let (dir, out) = project("present.proto", "syntax = \"proto3\";\n");
    let e = pagerpc_build::configure()
        .out_dir(&out)
        .emit_rerun_if_changed(false)
        .compile(&[dir.join("absent.proto")], &[&dir])
        .unwrap_err();
    assert!(matches!(e, pagerpc_build::Error::Compile(_)), "{e:?}");
}

#[test]
fn comments_become_rustdoc_and_options_files_are_not_generated() {
    let (r, out) = compile(
        "docs.proto",
        r#"syntax = "proto3";
package t.docs;
import "pagerpc/options.proto";
// A message.
message M {}
// The service's comment.
service Store {
  // Puts a thing, with a payload.
  rpc Put(M) returns (M) { option (pagerpc.payload) = REQUEST; }
  rpc Bare(M) returns (M);
}
"#,
    );
    r.unwrap();
    let files: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    // Only the user's package: not pagerpc/options.proto's, not Google's.
    assert_eq!(files, ["t.docs.rs"], "{files:?}");
    let code = std::fs::read_to_string(out.join("t.docs.rs")).unwrap();
    for want in [
        "/// The service's comment.",
        "/// Puts a thing, with a payload.",
        "/// Calls `Bare`.",
        "/// Handles `Bare`.",
        "pub const PUT: &str = \"t.docs.Store/Put\";",
        "pub struct StoreClient",
        "pub trait Store:",
        "pub struct StoreServer<S: Store>",
        "payload: impl ::std::convert::Into<::pagerpc::Payload>",
    ] {
        assert!(
            code.contains(want),
            "generated code lacks {want:?}:\n{code}"
        );
    }
}
