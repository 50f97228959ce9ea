//! The committed corpora: one file per target, `fuzz/corpus/<target>.bin`, holding the inputs
//! as a sequence of `u32` little-endian lengths each followed by its input (one file rather
//! than the thousands libFuzzer writes; `fuzz/run.sh` packs and unpacks them).
use std::path::Path;

pub fn pack(inputs: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for i in inputs {
        out.extend_from_slice(&(i.len() as u32).to_le_bytes());
        out.extend_from_slice(i);
    }
    out
}

/// The inputs of a packed corpus; a torn tail is ignored.
pub fn unpack(mut bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Some((len, rest)) = bytes.split_first_chunk::<4>() {
        let len = u32::from_le_bytes(*len) as usize;
        let Some(input) = rest.get(..len) else { break };
        out.push(input.to_vec());
        bytes = &rest[len..];
    }
    out
}

/// The committed corpus of a target (empty if there is none).
pub fn committed(target: &str) -> Vec<Vec<u8>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(format!("{target}.bin"));
    std::fs::read(path).map(|b| unpack(&b)).unwrap_or_default()
}

/// The files of a directory, sorted by name.
pub fn files(dir: &Path) -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let mut paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    paths
        .into_iter()
        .filter(|p| p.is_file())
        .filter_map(|p| std::fs::read(&p).ok())
        .collect()
}
