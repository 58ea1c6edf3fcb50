fn main() {
    println!("demo: under construction");
}
