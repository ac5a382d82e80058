fn main() {
    println!("forwarder: agent not wired yet");
}
