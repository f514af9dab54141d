fn main(){ println!("{}", lb_userspace::EBPF_OBJECT.len()); }
