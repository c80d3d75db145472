//! Writes the `firehose_commit` seeds into the directory named by the first argument.

fn main() -> std::io::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "corpus/firehose_commit".to_owned());
    std::fs::create_dir_all(&dir)?;
    let seeds = atpdb_fuzz::firehose::seeds();
    for (name, bytes) in &seeds {
        std::fs::write(std::path::Path::new(&dir).join(name), bytes)?;
    }
    println!("firehose_commit: wrote {} seeds to {dir}", seeds.len());
    Ok(())
}
