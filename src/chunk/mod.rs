pub type Cv = [u8; 32];
