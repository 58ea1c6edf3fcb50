fn main() {
    eprintln!("usage: pastry-node <ip> <port> [<bootstrap-ip> <bootstrap-port>] [options]");
    std::process::exit(2);
}
