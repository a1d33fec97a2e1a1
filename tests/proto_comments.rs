//! Every service, rpc, message, enum value and field of the API carries a comment,
//! so `grpcurl describe` explains the API to an operator without the source.

#[test]
fn every_element_of_the_proto_files_is_commented() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/secbeat/v1");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        for (index, line) in lines.iter().enumerate() {
            let declares = line.starts_with("service ")
                || line.starts_with("rpc ")
                || line.starts_with("message ")
                || line.starts_with("enum ")
                || (line.ends_with(';')
                    && line.contains(" = ")
                    && !line.starts_with("//")
                    && !line.starts_with("option ")
                    && !line.starts_with("syntax"));
            if !declares {
                continue;
            }
            checked += 1;
            let previous = index.checked_sub(1).map(|i| lines[i]).unwrap_or_default();
            // A field inside a oneof is documented by its own comment too.
            assert!(
                previous.starts_with("//"),
                "{}:{}: `{line}` has no comment above it",
                path.display(),
                index + 1
            );
        }
    }
    assert!(checked > 50, "only {checked} elements found");
}
