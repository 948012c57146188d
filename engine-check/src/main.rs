fn main() {
    println!("{}", lora_kernels::kernels_built());
}
