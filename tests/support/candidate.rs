//! The changed policy set that the replay and shadow tests evaluate against the shipped one.

use std::path::Path;

/// Copies the policies in `from` to `to` and edits them into the candidate: CI runners lose
/// GitHub reads, the organisation is renamed (alice's own-org issue is now another
/// organisation's), and bob may create issues.
pub fn candidate(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
    let edit = |name: &str, from: &str, to_text: &str| {
        let p = to.join(name);
        let t = std::fs::read_to_string(&p).unwrap();
        assert!(t.contains(from), "{name} has {from:?}");
        std::fs::write(&p, t.replacen(from, to_text, 1)).unwrap();
    };
    edit(
        "constants.yaml",
        "github_org: example",
        "github_org: example-renamed",
    );
    edit(
        "mcp_server.yaml",
        "      derivedRoles: [tailnet_person, ci_runner]\n      condition:\n        match:\n          expr: R.attr.server == \"github\"",
        "      derivedRoles: [tailnet_person]\n      condition:\n        match:\n          expr: R.attr.server == \"github\"",
    );
    edit(
        "mcp_server.yaml",
        "  rules:\n",
        "  rules:\n    - name: bob_may_file_issues\n      actions: [\"tools/call::create_issue\"]\n      effect: EFFECT_ALLOW\n      roles: [user]\n      condition:\n        match:\n          expr: P.attr.login == \"bob@example.com\"\n",
    );
}
